// A static file server on 127.0.0.1 for the scripts that drive the built page: `fileFor`
// maps a URL path to a file (or a folder, served as its index.html), or null for 404.
// Files are streamed, so a model's multi-GB external data never sits in node's memory.
import http from "node:http";
import fs from "node:fs";
import path from "node:path";

const MIME = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm",
  ".css": "text/css", ".json": "application/json" };

/// Starts serving; resolves to { base: "http://127.0.0.1:PORT", close() }.
export async function serve(fileFor) {
  const server = http.createServer((req, res) => {
    let file = fileFor(decodeURIComponent(new URL(req.url, "http://x").pathname));
    if (file && fs.existsSync(file) && fs.statSync(file).isDirectory()) file = path.join(file, "index.html");
    if (!file || !fs.existsSync(file)) { res.writeHead(404).end(); return; }
    res.writeHead(200, { "content-type": MIME[path.extname(file)] ?? "application/octet-stream", "content-length": fs.statSync(file).size });
    fs.createReadStream(file).pipe(res);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { base: `http://127.0.0.1:${server.address().port}`, close: () => server.close() };
}
