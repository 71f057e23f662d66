#!/usr/bin/env python3
"""CPU seconds used so far by each process tree named on the command line.

    cputree.py NAME=PID [NAME=PID ...]   ->   one line: NAME=SECONDS ...

A tree's time is the process's own (utime + stime), its reaped children's (cutime +
cstime: Dovecot's master reaps its imap processes) and its live descendants' own. Two
readings, before and after a phase, give where the machine's CPU went in between.
"""
import os
import sys

HZ = os.sysconf("SC_CLK_TCK")


def stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    # the command name may hold spaces: fields start after its closing parenthesis
    fields = text[text.rindex(")") + 2:].split()
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return ppid, utime + stime, cutime + cstime


def tree_seconds(root, table):
    own, reaped = table[root][1], table[root][2]
    total = own + reaped
    stack = [root]
    while stack:
        p = stack.pop()
        for child, (ppid, cpu, _) in table.items():
            if ppid == p:
                total += cpu
                stack.append(child)
    return total / HZ


def main():
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                table[int(entry)] = stat(entry)
            except (OSError, ValueError):
                pass
    out = []
    for arg in sys.argv[1:]:
        name, _, pid = arg.partition("=")
        pid = int(pid) if pid.isdigit() else -1
        out.append(f"{name}={tree_seconds(pid, table):.2f}" if pid in table else f"{name}=0")
    print(" ".join(out))


if __name__ == "__main__":
    main()
