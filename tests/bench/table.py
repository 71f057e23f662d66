#!/usr/bin/env python3
"""One table of benchmark runs, each beside the raw copier of its shape.

    table.py ROWS.tsv ... [--peers SHAPE=results.tsv ...]

A rows file (cluster.sh writes one) holds one run a line, tab-separated:
shape, run, wall seconds, messages, tool CPU s, source Dovecot CPU s, target Dovecot CPU
s, no-op pass s ('-' for none), note. `--peers` adds the runs of a peers.sh
results.tsv (bench.sh) as the shape named. Within a shape, the run whose name starts
with 'rawcopy' is the reference: every other figure is followed by its ratio to it.
"""
import sys


def read_rows(path):
    for line in open(path):
        shape, run, wall, msgs, tool, src, dst, noop, note = line.rstrip("\n").split("\t")
        yield shape, run, float(wall), int(msgs), float(tool), float(src), float(dst), noop, note


def read_peers(shape, path, messages):
    passes = {}
    for line in list(open(path))[1:]:
        tool, n, wall, cpu, rss, src, dst, verify = line.rstrip("\n").split("\t")
        passes[(tool, n)] = (float(wall), float(cpu), int(rss), float(src), float(dst), verify)
    for (tool, n), (wall, cpu, rss, src, dst, verify) in passes.items():
        if n != "1":
            continue
        noop = passes.get((tool, "2"), ("-",))[0]
        note = f"verify {verify}, peak RSS {rss} MiB"
        yield shape, tool, wall, messages, cpu, src, dst, noop, note


def main(argv):
    rows, peers = [], False
    for arg in argv:
        if arg == "--peers":
            peers = True
        elif peers:
            shape, _, rest = arg.partition("=")
            path, _, messages = rest.partition(":")
            rows.extend(read_peers(shape, path, int(messages)))
        else:
            rows.extend(read_rows(arg))
    raw = {r[0]: r for r in rows if r[1].startswith("rawcopy")}

    def vs(shape, value, index):
        ref = raw.get(shape)
        if ref is None or index is None:
            return ""
        of = ref[3] / ref[2] if index == "rate" else ref[index]
        return f" ({value / of:.2f}x)" if of else ""

    print("| shape | run | wall s | msgs/s | tool CPU s | source Dovecot CPU s | target Dovecot CPU s | no-op pass s | notes |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for shape, run, wall, msgs, tool, src, dst, noop, note in rows:
        rate = msgs / wall if wall else 0.0
        print(f"| {shape} | {run} | {wall:.1f} | {rate:.0f}{vs(shape, rate, 'rate')}"
              f" | {tool:.1f}{vs(shape, tool, 4)} | {src:.1f}{vs(shape, src, 5)}"
              f" | {dst:.1f}{vs(shape, dst, 6)} | {noop} | {note} |")


if __name__ == "__main__":
    main(sys.argv[1:])
