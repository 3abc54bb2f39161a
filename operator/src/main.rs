//! `nanogate-operator run | crd` — flags only; everything else lives in the library.

use clap::{Parser, Subcommand};
use nanogate_operator::RunOptions;

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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", nanogate_operator::crd_yaml()?);
            Ok(())
        }
        Command::Run(opts) => {
            nanogate_operator::init_logging(opts.log_format);
            nanogate_operator::run(*opts, nanogate_operator::shutdown_signal()).await
        }
    }
}
