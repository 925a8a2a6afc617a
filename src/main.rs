//! The `sp-gateway` binary: its command line is `sp_gateway::cli`.

/// mimalloc rather than glibc malloc: a profile of ingest spent about a quarter of its CPU
/// in glibc's allocator (sled copies tree nodes on every write); see BENCHMARKS.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    sp_gateway::cli::main()
}
