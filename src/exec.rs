//! `vtun exec` and `vtun ssh`.
