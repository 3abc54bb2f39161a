use std::process::ExitCode;

use nanogate_sidecar::config::Config;

fn main() -> ExitCode {
    let config = match Config::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nano-agent: {e:#}");
            return ExitCode::from(2);
        }
    };
    nanogate_sidecar::init_tracing(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    match runtime.block_on(nanogate_sidecar::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("nano-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
