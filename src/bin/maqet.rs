//! maqet: the command line for maqetd.

fn main() -> std::process::ExitCode {
    maqet::cli::main()
}
