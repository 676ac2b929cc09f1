//! The `shardflow` binary; everything is in the library (see `cli`).

/// mimalloc: QuickJS allocates many small objects per converter call (it
/// uses Rust's allocator through rquickjs' `rust-alloc`), and so does the
/// pipeline around it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    shardflow::cli::main()
}
