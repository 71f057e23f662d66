#!/usr/bin/env python3
"""Checks the workspace's `rust-version` against the locked dependencies: it must be at
least the highest `rust-version` any of them declares, or a user with the toolchain we
name cannot build what we lock. Run from the workspace root; `cargo metadata` reads
Cargo.lock (--locked) and needs no network once the registry index is cached."""
import json
import re
import subprocess
import sys


def parse(version):
    """`1.88` and `1.88.0` as (1, 88, 0), to compare."""
    parts = [int(p) for p in re.findall(r"\d+", version)][:3]
    return tuple(parts + [0] * (3 - len(parts)))


def main():
    meta = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--locked"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    members = set(meta["workspace_members"])
    ours = {p["rust_version"] for p in meta["packages"] if p["id"] in members}
    if len(ours) != 1 or None in ours:
        sys.exit(f"rust-version: every workspace crate should name the same one, found {ours}")
    ours = ours.pop()
    needed = max(
        ((parse(p["rust_version"]), p["rust_version"], p["name"]) for p in meta["packages"]
         if p["id"] not in members and p.get("rust_version")),
        default=None,
    )
    if needed and parse(ours) < needed[0]:
        sys.exit(
            f"rust-version = \"{ours}\" in Cargo.toml, but {needed[2]} (locked) needs "
            f"Rust {needed[1]}: raise it"
        )
    print(f"rust-version {ours} covers the locked dependencies (highest: "
          f"{needed[2] if needed else '-'} {needed[1] if needed else ''})")


if __name__ == "__main__":
    main()
