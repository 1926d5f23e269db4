//! The one dataset format every stage shares: parquet through arrow-rs, with the column catalogue
//! in `schema`, tolerant reading of the shapes users already have (`read`, `normalize`; JSON
//! Lines and JSON arrays through `json`), atomic
//! writing (`write`), resumable chunked outputs for sharded jobs (`chunks`) and `magpie inspect`.

pub mod chunks;
pub mod inspect;
pub mod json;
pub mod messages;
pub mod normalize;
pub mod read;
pub mod schema;
pub mod write;

pub use messages::Message;
pub use read::Dataset;
pub use write::DatasetWriter;
