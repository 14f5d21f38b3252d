//! Compile-time checks of `#[data_parallel]`: one rule per file in `tests/ui/`,
//! with the compiler's message pinned beside it (toolchain: rust-toolchain.toml).

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass_*.rs");
    t.compile_fail("tests/ui/fail_*.rs");
}
