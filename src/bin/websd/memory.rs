//! Peak memory, as `run` and `generate` report it.

/// Prints the process's peak resident host memory (Linux: `VmHWM`) and the GPU memory the
/// sessions hold. On a software adapter (lavapipe) GPU memory is host memory too.
pub fn report_memory(gpu_bytes: u64) {
    let mib = |bytes: u64| bytes as f64 / (1u64 << 20) as f64;
    let host = peak_resident_bytes()
        .map(|b| format!("{:.0} MiB", mib(b)))
        .unwrap_or_else(|| "unknown".into());
    eprintln!("memory: peak host {host}, GPU {:.0} MiB", mib(gpu_bytes));
}

/// The high-water mark of resident memory, where the system reports it.
fn peak_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
