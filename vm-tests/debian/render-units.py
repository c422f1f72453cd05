#!/usr/bin/env python3
"""Renders nixos/units.json (the unit definitions' single source, also read
by nixos/module.nix) into plain systemd unit files for a non-NixOS host.

    render-units.py UNITS_JSON OUTDIR [NAME=VALUE ...]

Placeholders default to a Debian-style install:
    @nixless@  = /usr/local/bin/nixless
    @config@   = /etc/nixless/agent.json
    @stateDir@ = /var/lib/nixless
NAME=VALUE pairs override them (e.g. stateDir=/srv/nixless). A value that is
a JSON array becomes one `Key=item` line per item, in order. Sections are
written in the order systemd documents them (Unit, Service/Path/…, Install).
"""
import json
import os
import sys

ORDER = ["Unit", "Service", "Socket", "Path", "Timer", "Mount", "Install"]


def render(unit, subst):
    def sub(v):
        if not isinstance(v, str):
            raise SystemExit(f"render-units: value {v!r} is neither a string nor a list of strings")
        for k, r in subst.items():
            v = v.replace(f"@{k}@", r)
        if "@" in v and any(f"@{k}@" in v for k in ("nixless", "config", "stateDir")):
            raise SystemExit(f"render-units: unsubstituted placeholder in {v!r}")
        return v

    out = []
    sections = sorted(unit, key=lambda s: ORDER.index(s) if s in ORDER else len(ORDER))
    for sec in sections:
        out.append(f"[{sec}]")
        for key, val in unit[sec].items():
            for item in (val if isinstance(val, list) else [val]):
                out.append(f"{key}={sub(item)}")
        out.append("")
    return "\n".join(out)


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    src, outdir = sys.argv[1], sys.argv[2]
    subst = {
        "nixless": "/usr/local/bin/nixless",
        "config": "/etc/nixless/agent.json",
        "stateDir": "/var/lib/nixless",
    }
    for kv in sys.argv[3:]:
        k, _, v = kv.partition("=")
        subst[k] = v
    with open(src) as f:
        units = json.load(f)
    os.makedirs(outdir, exist_ok=True)
    for name, unit in units.items():
        with open(os.path.join(outdir, name), "w") as f:
            f.write(f"# Rendered from {os.path.basename(src)} by render-units.py; do not edit.\n")
            f.write(render(unit, subst))
        print(name)


if __name__ == "__main__":
    main()
