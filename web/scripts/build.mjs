// Bundles src/main.ts -> dist/app.js and copies the static files into dist/.
// Type-checking is done separately by `tsc --noEmit` (see `npm run build`).
import { build, context } from "esbuild";
import { copyFile, mkdir, rm } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const dist = join(root, "dist");
const watch = process.argv.includes("--watch");

const STATIC_FILES = ["index.html", "style.css", "favicon.svg"];
// Third-party stylesheets copied as they are (from the lockfile-pinned packages).
const VENDOR_FILES = [["node_modules/@xterm/xterm/css/xterm.css", "xterm.css"]];

async function copyStatic() {
  await mkdir(dist, { recursive: true });
  for (const f of STATIC_FILES) {
    await copyFile(join(root, f), join(dist, f));
  }
  for (const [from, to] of VENDOR_FILES) {
    await copyFile(join(root, from), join(dist, to));
  }
}

const options = {
  entryPoints: [join(root, "src", "main.ts")],
  outfile: join(dist, "app.js"),
  bundle: true,
  format: "iife",
  target: ["es2020"],
  platform: "browser",
  sourcemap: true,
  minify: !watch,
  legalComments: "none",
  logLevel: "info",
};

if (watch) {
  await copyStatic();
  const ctx = await context(options);
  await ctx.watch();
  console.log("watching src/ (static files are copied once at start)");
} else {
  await rm(dist, { recursive: true, force: true });
  await copyStatic();
  await build(options);
}
