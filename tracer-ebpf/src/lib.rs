#![no_std]
// Empty library target: it lets tracer-user declare a build-dependency on this crate,
// so cargo rebuilds the BPF object when this crate changes.
