//! This repository's `hop` package: the `hop-serve` library (in `hop-serve/`), re-exported
//! whole under the name that `hop = { path = … }` dependents, and this repository's examples,
//! benches, tests and fuzz target, use. Its default features are what `hop`'s were before
//! hop-serve's got light (TLS, `hop::fs` and permessage-deflate on); each feature is
//! hop-serve's of the same name. Published crates depend on `hop-serve` instead, whose
//! library is named `hop` too.

pub use serve::*;
