//! `directcall-lambda`: the AWS Lambda behind API Gateway (REST v1 or HTTP
//! API v2). One MQTT connection per execution environment, made at init and
//! reused by every warm invocation. Configuration: `directcall_bins::lambda::config_from`.

use std::sync::Arc;

use directcall_bins::cli::init_tracing;
use directcall_bins::lambda::{config_from, LambdaState};
use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), Error> {
    init_tracing();
    let config = config_from(|name| std::env::var(name).ok()).map_err(Error::from)?;
    // Connect during init, before the first event arrives.
    let state = Arc::new(LambdaState::init(config).await.map_err(Error::from)?);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let state = Arc::clone(&state);
        async move {
            let deadline_ms = event.context.deadline;
            Ok::<Value, Error>(state.handle(&event.payload, deadline_ms).await)
        }
    }))
    .await
}
