fn main() -> std::process::ExitCode {
    shardflow::cli::main()
}
