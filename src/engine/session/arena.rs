//! Planning where intermediates live: each gets an offset in one of a few large shared
//! buffers ("slabs"), so that two intermediates share bytes only when their lifetimes do
//! not overlap. A launch may not write one part of a buffer while reading another (WebGPU
//! allows a writable storage buffer no other use in the same dispatch), so what a launch
//! writes and what it reads are kept in different slabs.
//!
//! Handing out whole buffers (best fit from a pool) wastes the difference between a buffer
//! and the smaller value put in it, and opens a new buffer whenever no single free one is
//! large enough even though enough free bytes sit in several. Offsets avoid both: the
//! slabs' total approaches the largest set of intermediates alive at one time. Each value
//! goes to the tightest gap among the values it overlaps in time, in three orders: largest
//! first (greedy by size, the classic offline order), in the order the launches write
//! them, and longest-lived first (a UNet's skip connections, which otherwise split the
//! slabs into gaps); the plan that adds fewer bytes wins. None is best everywhere: with
//! writes and reads kept apart, SD 1.5's VAE decoder at 512x512 (f32 activations) fits in
//! 640 MiB (what is alive at its peak) in launch order and takes 768 MiB largest first; its
//! fp16 UNet alone takes 240 MiB longest-lived first, 275-280 MiB in the other two orders.

/// An intermediate to place: alive from the launch group that writes it first (`born`) to
/// the last that reads it (`dies`), both inclusive.
#[derive(Clone, Copy, Debug)]
pub(super) struct Block {
    pub born: usize,
    pub dies: usize,
    pub bytes: u64,
}

/// Where a block lives: a slab and a byte offset in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Place {
    pub slab: usize,
    pub offset: u64,
}

/// A plan: each block's place, and every slab's size. Slabs `0..existing.len()` are the
/// ones passed in (sizes unchanged); the rest must be created.
#[derive(Debug)]
pub(super) struct Plan {
    pub places: Vec<Place>,
    pub slab_bytes: Vec<u64>,
}

/// Places `blocks` in the `existing` slabs (their sizes, which cannot grow) and in new
/// slabs of at most `new_slab_bytes` each (a block larger than that gets a slab of its
/// own), the two blocks of each pair in `apart` in different slabs. Offsets are multiples
/// of `align` (the storage binding offset alignment).
pub(super) fn plan(
    blocks: &[Block],
    apart: &[(usize, usize)],
    existing: &[u64],
    new_slab_bytes: u64,
    align: u64,
) -> Plan {
    let mut apart_from = vec![Vec::new(); blocks.len()];
    for &(a, b) in apart {
        apart_from[a].push(b);
        apart_from[b].push(a);
    }
    let mut largest_first: Vec<usize> = (0..blocks.len()).collect();
    largest_first.sort_by_key(|&i| (std::cmp::Reverse(blocks[i].bytes), blocks[i].born));
    let mut as_written = largest_first.clone();
    as_written.sort_by_key(|&i| (blocks[i].born, std::cmp::Reverse(blocks[i].bytes)));
    let mut longest_first = largest_first.clone();
    longest_first.sort_by_key(|&i| std::cmp::Reverse(blocks[i].dies - blocks[i].born));
    let added = |plan: &Plan| plan.slab_bytes[existing.len()..].iter().sum::<u64>();
    [largest_first, as_written, longest_first]
        .into_iter()
        .map(|order| {
            let plan = plan_in_order(blocks, &apart_from, &order, existing, new_slab_bytes, align);
            (added(&plan), plan)
        })
        .min_by_key(|(added, _)| *added)
        .map(|(_, plan)| plan)
        .expect("three orders")
}

/// `plan` with blocks placed in `order`.
fn plan_in_order(
    blocks: &[Block],
    apart_from: &[Vec<usize>],
    order: &[usize],
    existing: &[u64],
    new_slab_bytes: u64,
    align: u64,
) -> Plan {
    let mut slabs: Vec<Slab> = existing
        .iter()
        .map(|&bytes| Slab {
            capacity: bytes,
            extent: bytes,
            placed: Vec::new(),
        })
        .collect();
    let mut places: Vec<Option<Place>> = vec![None; blocks.len()];
    for &i in order {
        let block = blocks[i];
        let need = block.bytes.max(1).next_multiple_of(align);
        let kept_apart = |s: usize| {
            apart_from[i]
                .iter()
                .any(|&j| places[j].is_some_and(|p| p.slab == s))
        };
        let best = slabs
            .iter()
            .enumerate()
            .filter(|&(s, _)| !kept_apart(s))
            .filter_map(|(s, slab)| slab.fit(&block, need).map(|fit| (fit, s)))
            .min_by_key(|&(fit, s)| (fit.growth, fit.gap, s));
        let (slab, offset) = match best {
            Some((fit, s)) => (s, fit.offset),
            None => {
                slabs.push(Slab {
                    capacity: new_slab_bytes.max(need),
                    extent: 0,
                    placed: Vec::new(),
                });
                (slabs.len() - 1, 0)
            }
        };
        let target = &mut slabs[slab];
        target.extent = target.extent.max(offset + need);
        target.placed.push(Placed {
            block,
            offset,
            end: offset + need,
        });
        places[i] = Some(Place { slab, offset });
    }
    Plan {
        places: places.into_iter().flatten().collect(),
        slab_bytes: slabs.iter().map(|s| s.extent).collect(),
    }
}

struct Placed {
    block: Block,
    offset: u64,
    end: u64,
}

struct Slab {
    /// The most it may hold: an existing slab's size, or the cap on a new one.
    capacity: u64,
    /// What it holds now: an existing slab's size, or a new one's end of its last block.
    extent: u64,
    placed: Vec<Placed>,
}

/// A candidate offset, ranked by how much the slab must grow for it, then by the size of
/// the gap it takes (tightest first, keeping larger gaps for later blocks).
#[derive(Clone, Copy)]
struct Fit {
    offset: u64,
    growth: u64,
    gap: u64,
}

impl Slab {
    fn fit(&self, block: &Block, need: u64) -> Option<Fit> {
        let mut neighbours: Vec<&Placed> = self
            .placed
            .iter()
            .filter(|p| p.block.born <= block.dies && block.born <= p.block.dies)
            .collect();
        neighbours.sort_by_key(|p| p.offset);
        let mut best: Option<Fit> = None;
        let mut consider = |fit: Fit| {
            if best.is_none_or(|b| (fit.growth, fit.gap) < (b.growth, b.gap)) {
                best = Some(fit);
            }
        };
        let mut cursor = 0;
        for p in neighbours {
            if p.offset >= cursor + need {
                consider(Fit {
                    offset: cursor,
                    growth: 0,
                    gap: p.offset - cursor,
                });
            }
            cursor = cursor.max(p.end);
        }
        if cursor + need <= self.capacity {
            consider(Fit {
                offset: cursor,
                growth: (cursor + need).saturating_sub(self.extent),
                gap: self.capacity - cursor,
            });
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(born: usize, dies: usize, bytes: u64) -> Block {
        Block { born, dies, bytes }
    }

    /// No two blocks alive at the same time share a byte, and every block is inside its
    /// slab.
    fn assert_valid(blocks: &[Block], plan: &Plan) {
        for (i, (a, pa)) in blocks.iter().zip(&plan.places).enumerate() {
            assert!(
                pa.offset + a.bytes <= plan.slab_bytes[pa.slab],
                "block {i} outside"
            );
            for (b, pb) in blocks.iter().zip(&plan.places).skip(i + 1) {
                let live_together = a.born <= b.dies && b.born <= a.dies;
                let share = pa.slab == pb.slab
                    && pa.offset < pb.offset + b.bytes
                    && pb.offset < pa.offset + a.bytes;
                assert!(
                    !(live_together && share),
                    "{a:?} at {pa:?} and {b:?} at {pb:?}"
                );
            }
        }
    }

    #[test]
    fn a_chain_needs_two_of_its_largest_neighbours() {
        // x0 -> x1 -> x2 -> x3: each value lives while the next is written.
        let blocks = [
            block(0, 1, 256),
            block(1, 2, 512),
            block(2, 3, 256),
            block(3, 3, 128),
        ];
        let plan = plan(&blocks, &[], &[], 1 << 20, 256);
        assert_valid(&blocks, &plan);
        assert_eq!(plan.slab_bytes, vec![768]);
    }

    #[test]
    fn free_bytes_in_two_gaps_are_not_needed_whole() {
        // Whole buffers would take 3 x 256 + a new 512 for the last block; offsets fit it
        // where the two small ones lay once they are gone.
        let blocks = [
            block(0, 1, 256),
            block(0, 1, 256),
            block(0, 3, 256),
            block(2, 3, 512),
        ];
        let plan = plan(&blocks, &[], &[], 1 << 20, 256);
        assert_valid(&blocks, &plan);
        assert_eq!(plan.slab_bytes.iter().sum::<u64>(), 768);
    }

    #[test]
    fn existing_slabs_are_used_before_new_ones_and_never_grow() {
        let blocks = [block(0, 0, 300), block(1, 1, 1000), block(1, 1, 200)];
        let plan = plan(&blocks, &[], &[512], 4096, 256);
        assert_valid(&blocks, &plan);
        assert_eq!(plan.slab_bytes[0], 512);
        assert_eq!(plan.places[0].slab, 0);
        assert_eq!(plan.places[2].slab, 0);
        assert_eq!(plan.places[1], Place { slab: 1, offset: 0 });
        assert_eq!(plan.slab_bytes[1], 1024);
    }

    #[test]
    fn new_slabs_stay_under_their_cap_unless_one_block_is_larger() {
        let blocks = [block(0, 2, 600), block(1, 2, 600), block(2, 2, 5000)];
        let plan = plan(&blocks, &[], &[], 1024, 256);
        assert_valid(&blocks, &plan);
        assert_eq!(plan.slab_bytes.len(), 3);
        assert!(plan.slab_bytes.contains(&5120));
        assert!(plan.slab_bytes.iter().all(|&b| b <= 1024 || b == 5120));
    }

    #[test]
    fn what_a_launch_writes_is_in_another_slab_than_what_it_reads() {
        // y = f(x), z = g(y): x and z may share a slab, never with y.
        let blocks = [block(0, 1, 256), block(1, 2, 256), block(2, 2, 256)];
        let plan = plan(&blocks, &[(0, 1), (1, 2)], &[4096], 4096, 256);
        assert_valid(&blocks, &plan);
        assert_ne!(plan.places[0].slab, plan.places[1].slab);
        assert_ne!(plan.places[1].slab, plan.places[2].slab);
        assert_eq!(plan.slab_bytes.len(), 2, "x and z share the existing slab");
    }

    #[test]
    fn the_order_that_adds_fewer_bytes_wins() {
        // Largest first shares a slab between the 768-byte block and the first 512, puts
        // the second 512 (read by the 768) in another and the 256 (reading the first 512,
        // read by the second) in a third; in launch order two slabs hold just what is
        // alive at the end.
        let blocks = [
            block(0, 1, 512),
            block(1, 2, 256),
            block(2, 3, 512),
            block(3, 3, 768),
        ];
        let plan = plan(&blocks, &[(1, 0), (2, 1), (3, 2)], &[], 1 << 20, 256);
        assert_valid(&blocks, &plan);
        assert_eq!(plan.slab_bytes.iter().sum::<u64>(), 1280);
    }

    #[test]
    fn long_lived_blocks_first_can_win() {
        // Largest first and launch order both take 2048 bytes; longest-lived first fits
        // what is alive at launch 3 (1792 bytes).
        let blocks = [
            block(3, 3, 512),
            block(1, 2, 768),
            block(4, 5, 256),
            block(3, 4, 512),
            block(1, 3, 768),
        ];
        let plan = plan(&blocks, &[], &[], 1 << 20, 256);
        assert_valid(&blocks, &plan);
        assert_eq!(plan.slab_bytes.iter().sum::<u64>(), 1792);
    }

    #[test]
    fn offsets_are_aligned() {
        let blocks: Vec<Block> = (0..20)
            .map(|i| block(i / 3, i / 3 + 2, 4 + 13 * i as u64))
            .collect();
        let plan = plan(&blocks, &[], &[], 1 << 20, 256);
        assert_valid(&blocks, &plan);
        assert!(plan.places.iter().all(|p| p.offset % 256 == 0));
    }
}
