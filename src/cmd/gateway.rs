//! `vtun gateway`: validate the flags into `gateway::Options`, bind, print the address if asked,
//! serve until killed.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;

use super::Runtime;
use crate::cli::GatewayArgs;
use crate::gateway::{CertSource, Gateway, Options, Route};

fn options(args: &GatewayArgs) -> Result<Options> {
    let routes = args
        .routes
        .iter()
        .map(|r| Route::parse(r))
        .collect::<Result<Vec<_>>>()?;
    let cert = match (&args.cert, &args.key, &args.self_signed) {
        (Some(cert), Some(key), _) => CertSource::Files {
            cert: cert.clone(),
            key: key.clone(),
        },
        (_, _, Some(dir)) => CertSource::SelfSigned(dir.clone()),
        _ => anyhow::bail!("give --cert and --key, or --self-signed DIR"),
    };
    let idle_timeout = match args.idle_timeout {
        Some(s) if s.is_finite() && s > 0.0 => Some(Duration::from_secs_f64(s)),
        Some(_) => anyhow::bail!("--idle-timeout must be a positive number of seconds"),
        None => None,
    };
    let handshake_timeout = match args.handshake_timeout {
        s if s.is_finite() && s > 0.0 => Duration::from_secs_f64(s),
        _ => anyhow::bail!("--handshake-timeout must be a positive number of seconds"),
    };
    Ok(Options {
        routes,
        cert,
        delay: Duration::from_millis(args.delay_ms),
        idle_timeout,
        handshake_timeout,
        max_connections: args.max_connections,
    })
}

pub fn run(args: &GatewayArgs) -> Result<u8> {
    let gw = Arc::new(Gateway::new(options(args)?)?);
    Runtime::MultiThread.block_on(async {
        let listener = TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        if args.print_addr {
            super::print_stdout(&format!("{addr}\n"))?;
        }
        tracing::info!(%addr, routes = gw.routes.len(), "listening");
        gw.serve(listener).await
    })?;
    Ok(0)
}
