"""A generated C project for the cluster make tests and bench (deterministic)."""

from __future__ import annotations

from pathlib import Path

MAKEFILE = """\
CC ?= cc
CFLAGS ?= -O1
OBJS = {objs}

app: $(OBJS)
\t$(CC) -o $@ $(OBJS)
\t@echo linked app

%.o: %.c
\t$(CC) $(CFLAGS) -c $< -o $@
\t@echo compiled $<

clean:
\trm -f app $(OBJS)
"""


def generate(root: Path, units: int = 12, work: int = 200) -> Path:
    """Write `units` translation units plus main.c and a Makefile under `root`; return it.

    Each unit has `work` small functions, so one compile takes a few tens of ms.
    """
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for u in range(units):
        body = [f"int u{u}_f{i}(int x) {{ return x * {i + 1} + {u}; }}" for i in range(work)]
        calls = " + ".join(f"u{u}_f{i}(x)" for i in range(0, work, 7))
        body.append(f"int unit{u}(int x) {{ return {calls}; }}")
        (root / f"unit{u}.c").write_text("\n".join(body) + "\n")
        names.append(f"unit{u}")
    decls = "\n".join(f"int unit{u}(int x);" for u in range(units))
    total = " + ".join(f"unit{u}(3)" for u in range(units))
    (root / "main.c").write_text(
        f'#include <stdio.h>\n{decls}\nint main(void) {{ printf("%d\\n", {total}); return 0; }}\n'
    )
    names.append("main")
    (root / "Makefile").write_text(MAKEFILE.format(objs=" ".join(f"{n}.o" for n in names)))
    return root
