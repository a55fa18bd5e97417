//! The govsql binary: parses arguments and hands over to the library.

use clap::Parser;

fn main() {
    let cli = govsql::cli::Cli::parse();
    govsql::cli::init_tracing(&cli);
    std::process::exit(govsql::cli::main_with(cli));
}
