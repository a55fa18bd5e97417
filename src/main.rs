//! The govsql binary: parses arguments and hands over to the library.

use clap::Parser;

fn main() {
    govsql::cli::init_tracing();
    let cli = govsql::cli::Cli::parse();
    std::process::exit(govsql::cli::main_with(cli));
}
