//! The README's Rust client example is `examples/readme_client.rs`, which CI compiles: this
//! checks that the README still shows exactly that code.

#[test]
fn the_readme_shows_the_compiled_client_example() {
    let readme = include_str!("../../README.md");
    let section = &readme[readme
        .find("### The Rust client")
        .expect("the README has a Rust client section")..];
    let start = section.find("```rust\n").expect("a rust block") + "```rust\n".len();
    let shown = &section[start..start + section[start..].find("```").expect("a closed block")];
    let example = include_str!("../examples/readme_client.rs");
    assert!(
        example.starts_with(shown),
        "README.md's Rust client example and shared/examples/readme_client.rs differ"
    );
}
