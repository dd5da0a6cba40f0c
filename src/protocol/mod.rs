//! The wire protocol (PROTOCOL.md): decoding client frames, encoding
//! server frames, and the JSON of stored events. Only this module knows JSON.

pub mod decode;
pub mod encode;
pub mod event_json;

#[cfg(test)]
mod fuzz;
