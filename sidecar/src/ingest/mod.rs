//! Where messages enter the agent: the app socket ([`unix`], the Tendrl socket protocol) and
//! the optional TCP listener ([`tcp`], newline-delimited JSON frames). Both validate with the
//! same limits, stamp the same `source` and append to the spool in one write per read — the
//! moment a message is accepted — before they answer.

pub mod empty_check;
pub mod socket_file;
pub mod tcp;
pub mod unix;
