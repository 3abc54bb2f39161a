//! `nanogate-operator run | crd | selftest` — flags only; everything else lives in the library.

use clap::{Parser, Subcommand};
use nanogate_operator::RunOptions;

/// mimalloc, not the libc allocator (glibc's in tests, musl's in the image): at fleet scale
/// the hub's memory after a burst of connections is what the allocator gives back (issue 20).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "nanogate-operator", version, about = "The nanogate operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator (uses KUBECONFIG or the in-cluster service account).
    Run(Box<RunOptions>),
    /// Print the AgentGateway CustomResourceDefinition as YAML.
    Crd,
    /// Check an installed operator (what the chart's `helm test` pod runs): its /readyz
    /// answers, a valid AgentGateway is admitted (server-side dry run), and the validating
    /// webhook refuses an invalid one.
    Selftest(nanogate_operator::selftest::SelftestOptions),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", nanogate_operator::crd_yaml()?);
            Ok(())
        }
        Command::Selftest(opts) => {
            if let Err(error) = nanogate_operator::selftest::run(&opts).await {
                eprintln!("selftest failed: {error:#}");
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Run(opts) => {
            nanogate_operator::init_logging(opts.log_format);
            nanogate_operator::run(*opts, nanogate_operator::shutdown_signal()).await
        }
    }
}
