//! The OpenAPI document (`/api-docs/openapi.json`) and the Swagger UI at
//! `/swagger`, served from assets vendored into the binary so it works with
//! no internet access.

use axum::Router;
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

use crate::node::SharedNode;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "jobsched",
        description = "Replicated job scheduler: submit jobs to any node; workers acquire them under fenced leases."
    ),
    paths(
        super::jobs::create_job,
        super::jobs::create_jobs,
        super::jobs::get_job,
        super::jobs::list_jobs,
        super::jobs::acquire,
        super::jobs::complete,
        super::jobs::complete_many,
        super::jobs::release,
        super::jobs::cancel,
        super::workers::register,
        super::workers::heartbeat,
        super::workers::deregister,
        super::workers::list,
        super::workers::get_worker,
        super::cluster::health,
        super::cluster::ready,
        super::cluster::cluster,
        super::cluster::digest,
    ),
    components(schemas(jobsched_api::ErrorBody, jobsched_api::ErrorDetail))
)]
pub struct ApiDoc;

pub fn routes() -> Router<SharedNode> {
    Router::new().merge(SwaggerUi::new("/swagger").url("/api-docs/openapi.json", ApiDoc::openapi()))
}
