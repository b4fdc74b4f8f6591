//! The `mlxd_protocol` Python extension: the worker-protocol crate's own ring and
//! frame code, so the Python worker never touches shared memory with plain
//! `memoryview` writes (which have no ordering guarantees on ARM64).
use pyo3::prelude::*;

#[pymodule]
fn mlxd_protocol(m: &Bound<'_, PyModule>) -> PyResult<()> {
    worker_protocol::python::register(m)
}
