# Just enough of nixpkgs' lib, from builtins, to evaluate nixos/module.nix
# without nixpkgs (see module-eval.nix). The module system's properties
# (mkIf, mkMerge, mkDefault) stay as tagged values, the way nixpkgs' lib
# leaves them for the module system to push down; module-eval.nix resolves
# them itself. Option declarations are kept as plain tagged sets: the check
# reads what the module sets, not what it declares.
let
  inherit (builtins)
    attrNames
    concatMap
    elemAt
    filter
    foldl'
    isList
    isString
    length
    listToAttrs
    stringLength
    substring
    ;
in
rec {
  inherit (builtins)
    all
    any
    attrNames
    attrValues
    concatLists
    elem
    filter
    mapAttrs
    replaceStrings
    ;

  filterAttrs =
    pred: set:
    listToAttrs (
      concatMap (
        name:
        if pred name set.${name} then
          [
            {
              inherit name;
              value = set.${name};
            }
          ]
        else
          [ ]
      ) (attrNames set)
    );
  findFirst =
    pred: default: list:
    let
      found = filter pred list;
    in
    if found == [ ] then default else builtins.head found;
  getExe' = pkg: name: "${pkg}/bin/${name}";
  hasPrefix = prefix: s: substring 0 (stringLength prefix) s == prefix;
  imap0 = f: list: builtins.genList (i: f i (elemAt list i)) (length list);
  last = list: elemAt list (length list - 1);
  mapAttrsToList = f: set: map (name: f name set.${name}) (attrNames set);
  optional = cond: x: if cond then [ x ] else [ ];
  # Separators without regex metacharacters only (the module splits on ":").
  splitString = sep: s: filter isString (builtins.split sep s);
  toInt = s: builtins.fromJSON s;
  toList = x: if isList x then x else [ x ];
  unique = foldl' (acc: x: if builtins.elem x acc then acc else acc ++ [ x ]) [ ];

  literalExpression = text: {
    _type = "literalExpression";
    inherit text;
  };

  mkIf = condition: content: {
    _type = "if";
    inherit condition content;
  };
  mkMerge = contents: {
    _type = "merge";
    inherit contents;
  };
  mkDefault = content: {
    _type = "override";
    priority = 1000;
    inherit content;
  };

  mkOption = attrs: attrs // { _type = "option"; };
  mkEnableOption = name: mkOption { description = "Whether to enable ${name}."; };
  mkPackageOption =
    _pkgs: name: extra:
    mkOption { inherit name extra; };

  types = {
    attrsOf = t: "attribute set of ${t}";
    bool = "bool";
    str = "str";
    ints.positive = "positive int";
    listOf = t: "list of ${t}";
    enum = vs: "one of ${builtins.concatStringsSep ", " vs}";
    nullOr = t: "null or ${t}";
    strMatching = re: "string matching ${re}";
  };
}
