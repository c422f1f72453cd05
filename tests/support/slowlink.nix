# The "slow-link" closure for bench/slow-link.sh: 302 store paths, about
# 17 MB of compressed NARs (zstd), shaped like a small system closure rather
# than like bench.nix's flat fan-out:
#
# - 12 levels: the longest reference chain from the top has 12 paths, so a
#   breadth-first resolver needs 12 rounds of narinfo queries (the "reference
#   depth" in the link's bound). Widths per level: 1 4 12 24 36 44 48 44 36 26
#   16 11 (a system → services → packages → libraries → libc shape).
# - Every path references one path of the next level (which fixes the levels
#   exactly), a few deeper ones, and from level 6 down the first path of the
#   last level (the "libc" everyone links against).
# - Sizes: six big paths (3 MiB "kernel" at level 2, 2 MiB, 1.5 MiB, 1 MiB ×2,
#   768 KiB) and 296 small ones cycling through 1..96 KiB; each file is half
#   random bytes, half repetitive text, so the compressed size is about the
#   random half (R below) and the NAR about 2 R.
#
#   nix-build tests/support/slowlink.nix --argstr salt slowlink-v1
#
# Requires `sandbox = false` (builders use the host's /bin/sh and coreutils).
{ salt ? "" }:
let
  widths = [ 1 4 12 24 36 44 48 44 36 26 16 11 ];
  depth = builtins.length widths;
  width = l: builtins.elemAt widths (l - 1);
  mod = a: b: a - (a / b) * b;

  small = [ 1 2 3 4 6 8 12 16 24 32 48 64 96 ];
  # KiB of random data for path j of level l (the NAR has twice that).
  big = { "2-0" = 3072; "9-3" = 2048; "7-5" = 1536; "5-2" = 1024; "12-0" = 1024; "10-1" = 768; };
  kib = l: j:
    let key = "${toString l}-${toString j}"; in
    if big ? ${key} then big.${key}
    else builtins.elemAt small (mod (l * 31 + j * 7) (builtins.length small));

  # References of path j at level l, as (level, index) pairs.
  refsOf = l: j:
    let
      next = if l < depth then
        builtins.filter (i: mod i (width l) == j) (builtins.genList (i: i) (width (l + 1)))
      else [ ];
      # A path with no child of the next level still hangs off one (fan-in).
      nextRefs = if l < depth then
        (if next == [ ] then [ (mod j (width (l + 1))) ] else next)
      else [ ];
      deeper = builtins.filter (p: p.l <= depth) [
        { l = l + 2 + mod j 3; i = mod (j * 7 + 3) 1000; }
        { l = l + 3 + mod j 2; i = mod (j * 13 + 5) 1000; }
      ];
      libc = if l >= 6 && l < depth then [ { l = depth; i = 0; } ] else [ ];
    in map (i: { l = l + 1; inherit i; }) nextRefs
      ++ map (p: { l = p.l; i = mod p.i (width p.l); }) deeper
      ++ libc;

  levels = builtins.genList (k:
    let l = k + 1; in
    builtins.genList (j: mkPath l j) (width l)) depth;
  at = p: builtins.elemAt (builtins.elemAt levels (p.l - 1)) p.i;

  mkPath = l: j:
    let r = kib l j; in
    derivation {
      name = if l == 1 then "nixless-slowlink-top" else "nixless-slowlink-${toString l}-${toString j}";
      system = "x86_64-linux";
      builder = "/bin/sh";
      inherit salt;
      # Store paths written into the output become its references.
      deps = map at (refsOf l j);
      args = [ "-c" ''
        export PATH=/usr/bin:/bin; set -e
        mkdir -p $out/nix-support $out/lib
        for d in $deps; do echo "$d"; done > $out/nix-support/propagated
        head -c ${toString r}K /dev/urandom > $out/lib/data.bin
        yes "slowlink ${toString l} ${toString j} $salt" | head -c ${toString r}K >> $out/lib/data.bin
      '' ];
    };
in
at { l = 1; i = 0; }
