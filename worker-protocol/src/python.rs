//! PyO3 bindings: the worker's end of a segment, and frame helpers, so the Python
//! worker uses exactly this crate's ring code (Release/Acquire ordering included).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyOSError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::frame::{token_batch_len, write_token_batch, Kind, PROTOCOL_VERSION};
use crate::ring::{Consumer, Producer, Pushed};
use crate::segment::{Direction, Heartbeat, Segment};

fn os_err(e: impl std::fmt::Display) -> PyErr {
    PyOSError::new_err(e.to_string())
}

/// The worker's end of a segment: it consumes requests and produces events.
#[pyclass(frozen)]
struct WorkerRings {
    requests: Mutex<Consumer>,
    events: Mutex<Producer>,
    heartbeat: Heartbeat,
    // Keeps the segment (and its mapping) alive as long as the rings.
    _segment: Segment,
}

impl WorkerRings {
    /// Pushes with bounded waiting while the daemon drains the ring.
    fn push_blocking(
        &self,
        kind: u16,
        flags: u16,
        len: usize,
        fill: impl Fn(&mut [u8]),
        timeout: Duration,
    ) -> PyResult<bool> {
        let deadline = Instant::now() + timeout;
        let mut spins = 0u32;
        let mut tx = self.events.lock().map_err(os_err)?;
        loop {
            match tx
                .try_push_with(kind, flags, len, &fill)
                .map_err(|e| PyValueError::new_err(e.to_string()))?
            {
                Pushed::Yes { wake } => return Ok(wake),
                Pushed::Full if Instant::now() >= deadline => {
                    return Err(PyTimeoutError::new_err(
                        "events ring full: daemon is not draining",
                    ))
                }
                Pushed::Full => {
                    spins += 1;
                    if spins < 64 {
                        std::hint::spin_loop();
                    } else {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                }
            }
        }
    }
}

#[pymethods]
impl WorkerRings {
    /// Opens segment `name`, which must belong to incarnation `generation`: a
    /// worker never talks over a ring meant for another start of its model.
    #[new]
    #[pyo3(signature = (name, generation=None))]
    fn new(name: &str, generation: Option<u64>) -> PyResult<Self> {
        let segment = Segment::open(name).map_err(os_err)?;
        if let Some(want) = generation {
            if segment.generation() != want {
                return Err(PyValueError::new_err(format!(
                    "segment {name} belongs to generation {}, not {want}",
                    segment.generation()
                )));
            }
        }
        let requests = segment.consumer(Direction::ToWorker).map_err(os_err)?;
        let events = segment.producer(Direction::ToDaemon).map_err(os_err)?;
        Ok(WorkerRings {
            requests: Mutex::new(requests),
            events: Mutex::new(events),
            heartbeat: segment.heartbeat(),
            _segment: segment,
        })
    }

    /// Advances the heartbeat counter the daemon watches for progress.
    fn beat(&self) {
        self.heartbeat.beat();
    }

    /// Next request frame as (kind, flags, payload), or None if the ring is empty.
    fn pop<'py>(&self, py: Python<'py>) -> PyResult<Option<(u16, u16, Bound<'py, PyBytes>)>> {
        let mut rx = self.requests.lock().map_err(os_err)?;
        rx.pop_with(|k, f, p| (k, f, PyBytes::new(py, p)))
            .map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// Publishes one event frame. Returns True if the daemon is asleep and the caller
    /// must write one byte to the doorbell pipe. Waits (GIL released) up to
    /// `timeout_s` while the ring is full.
    #[pyo3(signature = (kind, payload, flags=0, timeout_s=30.0))]
    fn push(
        &self,
        py: Python<'_>,
        kind: u16,
        payload: &[u8],
        flags: u16,
        timeout_s: f64,
    ) -> PyResult<bool> {
        let timeout = Duration::from_secs_f64(timeout_s);
        py.detach(|| {
            self.push_blocking(
                kind,
                flags,
                payload.len(),
                |d| d.copy_from_slice(payload),
                timeout,
            )
        })
    }

    /// Publishes one TokenBatch frame built from (id, token, text) entries, encoded
    /// straight into the ring. Returns True if the doorbell must be rung.
    #[pyo3(signature = (entries, timeout_s=30.0))]
    fn push_token_batch(
        &self,
        py: Python<'_>,
        entries: Vec<(u64, u32, String)>,
        timeout_s: f64,
    ) -> PyResult<bool> {
        let parts = || {
            entries
                .iter()
                .map(|(id, token, text)| (*id, *token, text.as_bytes()))
        };
        let len = token_batch_len(parts().map(|p| p.2));
        let timeout = Duration::from_secs_f64(timeout_s);
        py.detach(|| {
            self.push_blocking(
                Kind::TokenBatch as u16,
                0,
                len,
                |dst| write_token_batch(parts(), dst),
                timeout,
            )
        })
    }

    /// Announce sleep; True means the ring is still empty and the caller should block
    /// on its doorbell pipe now.
    fn prepare_sleep(&self) -> PyResult<bool> {
        Ok(self.requests.lock().map_err(os_err)?.prepare_sleep())
    }

    fn finish_sleep(&self) -> PyResult<()> {
        self.requests.lock().map_err(os_err)?.finish_sleep();
        Ok(())
    }

    fn max_payload(&self) -> PyResult<usize> {
        Ok(self.events.lock().map_err(os_err)?.max_payload())
    }
}

/// TokenBatch payload for (id, token, text) entries (the stdio path uses it too).
#[pyfunction]
fn encode_token_batch<'py>(
    py: Python<'py>,
    entries: Vec<(u64, u32, String)>,
) -> Bound<'py, PyBytes> {
    let parts = || {
        entries
            .iter()
            .map(|(id, token, text)| (*id, *token, text.as_bytes()))
    };
    let mut out = vec![0u8; token_batch_len(parts().map(|p| p.2))];
    write_token_batch(parts(), &mut out);
    PyBytes::new(py, &out)
}

/// {name: value} of every frame kind, for the drift test against frames.py.
#[pyfunction]
fn frame_kinds() -> Vec<(&'static str, u16)> {
    Kind::ALL.iter().map(|k| (k.name(), *k as u16)).collect()
}

/// The JSON frames' schema as JSON text (`scripts/gen_protocol.py` generates the
/// worker's typed frames from it; the drift test compares).
#[pyfunction]
fn frame_schema() -> String {
    crate::schema::frame_schemas().to_string()
}

/// (kind, payload) of one frame of every JSON kind with every field set.
#[pyfunction]
fn frame_examples<'py>(py: Python<'py>) -> Vec<(u16, Bound<'py, PyBytes>)> {
    crate::schema::examples()
        .iter()
        .map(|f| {
            let mut payload = Vec::new();
            f.encode_payload(&mut payload);
            (f.kind() as u16, PyBytes::new(py, &payload))
        })
        .collect()
}

/// Decodes a JSON frame as the daemon does (unknown fields are an error) and
/// returns it encoded again.
#[pyfunction]
fn decode_strict<'py>(py: Python<'py>, kind: u16, payload: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    crate::schema::decode_strict(kind, payload)
        .map(|out| PyBytes::new(py, &out))
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("PROTOCOL_VERSION", PROTOCOL_VERSION)?;
    m.add_class::<WorkerRings>()?;
    m.add_function(wrap_pyfunction!(encode_token_batch, m)?)?;
    m.add_function(wrap_pyfunction!(frame_kinds, m)?)?;
    m.add_function(wrap_pyfunction!(frame_schema, m)?)?;
    m.add_function(wrap_pyfunction!(frame_examples, m)?)?;
    m.add_function(wrap_pyfunction!(decode_strict, m)?)?;
    Ok(())
}
