fn main() -> std::process::ExitCode {
    voxtrald::cli::main()
}
