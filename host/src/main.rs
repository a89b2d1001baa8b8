use std::process::ExitCode;

fn main() -> ExitCode {
    ferrotune::run::main_with_args(std::env::args().collect())
}
