//! `run`: opens the store, serves the admin socket, starts the pipelines and shuts all of
//! it down cleanly on SIGTERM/SIGINT (SPEC §2.10).

use std::sync::Arc;

use anyhow::Context;

use crate::admin::{self, Status};
use crate::config::Config;
use crate::store::{Store, StoreOptions};

pub fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bridge")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_async(config))
}

pub fn store_options(config: &Config) -> StoreOptions {
    StoreOptions {
        flush_interval: config.bridge.flush_interval,
        flush_max_items: config.bridge.flush_max_items,
        ..StoreOptions::default()
    }
}

async fn run_async(config: Config) -> anyhow::Result<()> {
    for key in &config.unknown_keys {
        tracing::warn!(key = %key, "unknown configuration key ignored (a typo?)");
    }
    let data_dir = config.bridge.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    let options = store_options(&config);
    let open_dir = data_dir.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&open_dir, &options))
        .await
        .context("opening the store")??;
    let store = Arc::new(store);
    tracing::info!(
        path = %store.path().display(),
        indicators = store.len(crate::store::Queue::Indicators),
        sightings = store.len(crate::store::Queue::Sightings),
        dead = store.dead_len(),
        "store open"
    );
    let status = Arc::new(Status::default());
    status.set("store", "open");
    let listener = admin::bind(&data_dir)?;
    let admin_task = tokio::spawn(admin::serve(
        listener,
        Arc::clone(&store),
        Arc::clone(&status),
    ));

    let signal = wait_for_shutdown().await?;
    tracing::info!(signal, "shutting down");
    admin_task.abort();
    let _ = std::fs::remove_file(admin::socket_path(&data_dir));
    tokio::task::spawn_blocking(move || store.close())
        .await
        .context("closing the store")??;
    tracing::info!("store flushed; bye");
    Ok(())
}

async fn wait_for_shutdown() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
