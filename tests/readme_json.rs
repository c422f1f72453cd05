//! README.md's JSON examples are what the code reads: every fenced ```json
//! block parses (through the depth-checked reader) as the struct its keys
//! say it is, and reads back the same after our writer wrote it. A block
//! that matches no struct fails, so an example added later is checked too.

use nixless::api;
use nixless::deploy::{self, Action, Document};
use nixless::json::{from_slice_bounded, to_string};

/// The bodies of README's ```json blocks, with the line each starts on.
fn json_blocks(readme: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut open: Option<(usize, String)> = None;
    for (n, line) in readme.lines().enumerate() {
        match (&mut open, line.trim_start()) {
            (None, l) if l.starts_with("```json") => open = Some((n + 2, String::new())),
            (Some(_), l) if l.starts_with("```") => out.push(open.take().unwrap()),
            (Some((_, body)), _) => {
                body.push_str(line);
                body.push('\n');
            }
            _ => {}
        }
    }
    assert!(open.is_none(), "README.md: unclosed ```json block");
    out
}

fn check(at: usize, block: &str) -> Result<(), String> {
    let has = |k: &str| block.contains(&format!("\"{k}\""));
    // A status names a job with its own seq and action: it goes first.
    if has("phase") && has("host") {
        let s: api::Status = from_slice_bounded(block.as_bytes()).map_err(|e| format!("status: {e}"))?;
        assert_eq!(from_slice_bounded::<api::Status>(to_string(&s).unwrap().as_bytes()).unwrap(), s);
        Ok(())
    } else if has("host") && has("seq") && has("action") {
        let d: Document = from_slice_bounded(block.as_bytes()).map_err(|e| format!("deploy document: {e}"))?;
        let action = Action::parse(&d.action).ok_or(format!("unknown action {:?}", d.action))?;
        let again = deploy::render(
            &d.host,
            d.system.as_deref(),
            d.seq,
            action,
            d.caches.as_deref().unwrap_or_default(),
            d.narinfos.as_deref().unwrap_or_default(),
        )
        .unwrap();
        assert_eq!(from_slice_bounded::<Document>(again.as_bytes()).unwrap(), d, "README.md:{at}");
        Ok(())
    } else if has("error") {
        from_slice_bounded::<api::Error>(block.as_bytes()).map(drop).map_err(|e| format!("error body: {e}"))
    } else {
        Err("no struct for this example: teach tests/readme_json.rs which one it is".into())
    }
}

#[test]
fn readme_json_examples_parse() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let blocks = json_blocks(&readme);
    assert!(!blocks.is_empty(), "README.md has JSON examples (the deploy document at least)");
    let bad: Vec<String> =
        blocks.iter().filter_map(|(at, b)| check(*at, b).err().map(|e| format!("README.md:{at}: {e}"))).collect();
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn a_broken_example_is_caught() {
    let md = "x\n```json\n{\"host\": \"h\", \"seq\": 1, \"action\": \"switch\",}\n```\n```json\n{\"other\": 1}\n```\n";
    let blocks = json_blocks(md);
    assert_eq!(blocks.iter().map(|b| b.0).collect::<Vec<_>>(), vec![3, 6]);
    assert!(check(3, &blocks[0].1).is_err(), "trailing comma");
    assert!(check(6, &blocks[1].1).unwrap_err().contains("no struct"));
    let ok = "```json\n{\"host\": \"h\", \"seq\": 1,\n \"action\": \"gc\", \"narinfos\": [\"a\\nb\"]}\n```\n";
    assert_eq!(check(1, &json_blocks(ok)[0].1), Ok(()));
}
