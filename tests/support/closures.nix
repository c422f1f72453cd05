# Test closure for nixless. Evaluates to ONE top-level derivation
# ("nixless-test-top") whose runtime closure covers the NAR / store-path
# shapes nixless must handle. No nixpkgs: every builder is /bin/sh using the
# host's coreutils (requires `sandbox = false`).
#
# `salt` is put into every derivation's environment, so a different salt
# yields a completely fresh set of store paths (for benchmarks).
#
# $TOP/deps lists every special path as NAME=/nix/store/... lines.
{ salt ? "" }:
let
  mk = name: script: derivation {
    inherit name salt;
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = [ "-c" ("export PATH=/usr/bin:/bin; set -e; " + script) ];
  };

  # Directory with mixed entry kinds.
  dir = mk "nixless-test-dir" ''
    mkdir -p $out/bin $out/share/doc/nested/deeper $out/empty-dir
    printf '#!/bin/sh\necho hello from nixless\n' > $out/bin/hello
    chmod 755 $out/bin/hello
    printf 'plain file contents\n' > $out/share/plain.txt
    printf 'nested\n' > $out/share/doc/nested/deeper/leaf.txt
    : > $out/share/empty-file
    ln -s ../share/plain.txt $out/bin/rel-link
    ln -s doc/nested $out/share/dir-link
    ln -s /etc/hostname $out/abs-link
    ln -s does/not/exist $out/dangling-link
  '';

  # $out is a single regular file.
  file = mk "nixless-test-file" ''
    printf 'I am a single-file store path\n' > $out
  '';

  # $out is a single executable file.
  execFile = mk "nixless-test-exec-file" ''
    printf '#!/bin/sh\necho single executable\n' > $out
    chmod 755 $out
  '';

  # $out is a symlink (absolute, outside the store).
  symlink = mk "nixless-test-symlink" ''
    ln -s /bin/sh $out
  '';

  # References itself.
  selfRef = mk "nixless-test-selfref" ''
    mkdir -p $out/bin
    printf '%s\n' "$out" > $out/self
    printf '#!/bin/sh\nexec %s/self\n' "$out" > $out/bin/run
    chmod 755 $out/bin/run
  '';

  # 40 nested directories with a file at the bottom.
  deep = mk "nixless-test-deep" ''
    d=$out
    i=1
    while [ $i -le 40 ]; do d=$d/level-$i; i=$((i+1)); done
    mkdir -p $d
    printf 'bottom of the well\n' > $d/bottom.txt
  '';

  # Non-ASCII and otherwise awkward names.
  names = mk "nixless-test-names" ''
    mkdir -p "$out/日本" "$out/.hidden-dir" "$out/dir with spaces"
    printf 'u-umlaut\n' > "$out/ü.txt"
    printf 'nihon\n' > "$out/日本/語.txt"
    printf 'crab\n' > "$out/🦀.rs"
    printf 'space\n' > "$out/with space.txt"
    printf 'eq\n' > "$out/a=b"
    printf 'plus\n' > "$out/c+d"
    printf 'question\n' > "$out/what?"
    printf 'hash\n' > "$out/#hash%percent"
    printf 'dot\n' > "$out/.dotfile"
    printf 'dotdir\n' > "$out/.hidden-dir/.inner"
    printf 'spaces\n' > "$out/dir with spaces/file with spaces"
    ln -s "ü.txt" "$out/link-to-ü"
  '';

  # 3000 small files over 30 subdirectories.
  many = mk "nixless-test-many" ''
    d=0
    while [ $d -lt 30 ]; do
      mkdir -p $out/sub-$d
      f=0
      while [ $f -lt 100 ]; do
        printf 'file %s/%s\n' $d $f > $out/sub-$d/file-$f
        f=$((f+1))
      done
      d=$((d+1))
    done
  '';

  # One ~24 MiB file: 12 MiB incompressible + 12 MiB compressible.
  big = mk "nixless-test-big" ''
    mkdir -p $out
    head -c 12M /dev/urandom > $out/big.bin
    yes 'nixless compressible filler line 0123456789' | head -c 12M >> $out/big.bin
  '';

  # Chain A -> B -> C.
  chainC = mk "nixless-test-chain-c" ''
    printf 'end of chain\n' > $out
  '';
  chainB = mk "nixless-test-chain-b" ''
    mkdir -p $out
    printf '%s\n' "${chainC}" > $out/next
  '';
  chainA = mk "nixless-test-chain-a" ''
    mkdir -p $out
    printf '%s\n' "${chainB}" > $out/next
  '';

  # Diamond: top -> left, right; left -> common; right -> common.
  diamondCommon = mk "nixless-test-diamond-common" ''
    mkdir -p $out
    printf 'shared\n' > $out/common.txt
  '';
  diamondLeft = mk "nixless-test-diamond-left" ''
    mkdir -p $out
    printf '%s\n' "${diamondCommon}" > $out/dep
  '';
  diamondRight = mk "nixless-test-diamond-right" ''
    mkdir -p $out
    printf '%s\n' "${diamondCommon}" > $out/dep
  '';
  diamondTop = mk "nixless-test-diamond-top" ''
    mkdir -p $out
    printf '%s\n%s\n' "${diamondLeft}" "${diamondRight}" > $out/deps
  '';

  parts = {
    P_DIR = dir;
    P_FILE = file;
    P_EXEC_FILE = execFile;
    P_SYMLINK = symlink;
    P_SELFREF = selfRef;
    P_DEEP = deep;
    P_NAMES = names;
    P_MANY = many;
    P_BIG = big;
    P_CHAIN_A = chainA;
    P_CHAIN_B = chainB;
    P_CHAIN_C = chainC;
    P_DIAMOND_TOP = diamondTop;
    P_DIAMOND_LEFT = diamondLeft;
    P_DIAMOND_RIGHT = diamondRight;
    P_DIAMOND_COMMON = diamondCommon;
  };

  depsText = builtins.concatStringsSep "\n"
    (map (k: "${k}=${parts.${k}}") (builtins.attrNames parts)) + "\n";
in
mk "nixless-test-top" ''
  mkdir -p $out/bin
  cat > $out/deps <<'NIXLESS_EOF'
  ${depsText}NIXLESS_EOF
  ln -s ${execFile} $out/bin/exec-file
  ln -s ${dir}/bin/hello $out/bin/hello
''
