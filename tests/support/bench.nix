# Benchmark closure for nixless: one top derivation referencing `n` small
# store paths (a directory with a couple of small files each) and one path
# holding a single file of `bigMiB` MiB (half /dev/urandom, half repetitive
# text). `salt` changes every store path and the small files' contents, so
# each salt gives a fresh closure.
#
#   nix-build tests/support/bench.nix --argstr salt "$RANDOM" --arg n 1000 --arg bigMiB 256
#
# $TOP/small lists the small paths (one a line); $TOP/big is the big path.
# Requires `sandbox = false` (builders use the host's /bin/sh and coreutils).
{ salt ? "", n ? 1000, bigMiB ? 256 }:
let
  mk = name: script: extra: derivation ({
    inherit name salt;
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = [ "-c" ("export PATH=/usr/bin:/bin; set -e; " + script) ];
  } // extra);

  small = builtins.genList (i:
    mk "nixless-bench-small-${toString i}" ''
      mkdir $out
      echo "small path ${toString i} salt $salt" > $out/a.txt
      echo "second file of ${toString i}" > $out/b.txt
    '' { }) n;

  halfKiB = toString (bigMiB * 512);
  big = mk "nixless-bench-big" ''
    mkdir $out
    head -c ${halfKiB}K /dev/urandom > $out/big.bin
    yes "nixless benchmark compressible line $salt" | head -c ${halfKiB}K >> $out/big.bin
  '' { };
in
mk "nixless-bench-top" ''
  mkdir $out
  cp "$smallPath" $out/small
  echo "$bigPath" > $out/big
'' {
  # passAsFile: with n in the thousands the list exceeds the 128 KiB limit
  # on a single argument / environment string.
  small = builtins.concatStringsSep "\n" (map toString small) + "\n";
  bigPath = big;
  passAsFile = [ "small" ];
}
