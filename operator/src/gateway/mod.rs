//! Rules of a gateway that more than one part of the operator follows, each in one place and
//! free of I/O: [`refs`], the Secrets a gateway references; [`membership`], which pods belong
//! to it.

pub mod membership;
pub mod refs;
