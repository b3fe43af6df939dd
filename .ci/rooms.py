#!/usr/bin/env python3
"""The rooms of hop-serve/src/ (its top-level modules) import one another one way: no import
circle.

Reads every `crate::ROOM` path outside unit tests (`#[cfg(test)] mod tests`, `tests.rs`) and
comments, and fails, naming the rooms and files, if the room graph has a cycle, or if the
README's Layout table misplaces a room: each room must sit in a row below every room that
imports it (or after it in the same row), and every room must be in the table. With
`--order` it prints the rooms from the top (those nothing imports) down.
"""
import collections
import os
import re
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "hop-serve", "src")


def rooms():
    edges, where = collections.defaultdict(set), collections.defaultdict(set)
    names = {f[:-3] if f.endswith(".rs") else f for f in os.listdir(SRC)} - {"lib"}
    for root, _, files in os.walk(SRC):
        for f in files:
            if not f.endswith(".rs") or f == "tests.rs":
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, SRC)
            top = rel.split(os.sep)[0].removesuffix(".rs")
            if top == "lib":
                continue
            src = open(path, encoding="utf-8").read()
            cut = re.search(r"#\[cfg\((?:all\()?test[^\]]*\]\s*mod tests", src)
            if cut:
                src = src[: cut.start()]
            src = re.sub(r"//[^\n]*", "", src)
            for m in re.finditer(r"crate::([a-z_0-9]+)", src):
                t = m.group(1)
                if t != top and t in names:
                    edges[top].add(t)
                    where[(top, t)].add(rel)
    return names, edges, where


def main():
    names, edges, where = rooms()
    # Depth-first: a back edge is a circle.
    state, order, circles = {}, [], []

    def visit(v, path):
        state[v] = 1
        for w in sorted(edges.get(v, ())):
            if state.get(w) == 1:
                circles.append(path[path.index(w):] + [w] if w in path else [v, w])
            elif w not in state:
                visit(w, path + [w])
        state[v] = 2
        order.append(v)

    for v in sorted(names):
        if v not in state:
            visit(v, [v])
    if circles:
        for c in circles[:5]:
            print("import circle: " + " -> ".join(c), file=sys.stderr)
            for a, b in zip(c, c[1:]):
                print(f"  {a} -> {b}: {', '.join(sorted(where[(a, b)]))}", file=sys.stderr)
        sys.exit(1)
    readme = open(os.path.join(SRC, "..", "..", "README.md"), encoding="utf-8").read()
    table = readme[readme.index("| module | owns |"):]
    table = table[: table.index("\n\n")]
    pos = {}
    for r, line in enumerate(table.split("\n")[2:]):
        for k, name in enumerate(re.findall(r"`([a-z_0-9]+)/?`", line.split(" | ")[0])):
            pos.setdefault(name, (r, k))
    wrong = False
    for name in sorted(names - set(pos)):
        print(f"README Layout: no row for `{name}`", file=sys.stderr)
        wrong = True
    for a in sorted(edges):
        for b in sorted(edges[a]):
            if a in pos and b in pos and not pos[b] > pos[a]:
                files = ", ".join(sorted(where[(a, b)]))
                print(f"README Layout: `{a}` imports `{b}` ({files}) but sits below it",
                      file=sys.stderr)
                wrong = True
    if wrong:
        sys.exit(1)
    if "--order" in sys.argv:
        print(" > ".join(reversed(order)))


if __name__ == "__main__":
    main()
