//! The poller a thread runs, if any: its id, its local run queue (keys woken on this thread,
//! driven at the poller's next turn) and the tasks spawned on it since the poller last looked.
//! One value per thread, owned by the poller running there; nothing in it is per connection.

use std::cell::{Cell, RefCell};

use super::tasks::Task;
use super::wake::Key;

#[derive(Default)]
struct Local {
    poller: Cell<Option<u16>>,
    ready: RefCell<Vec<Key>>,
    spawned: RefCell<Vec<Task>>,
}

thread_local! {
    static LOCAL: Local = Local::default();
}

/// Marks the current thread as poller `id`'s thread.
pub(crate) fn enter_poller(id: u16) {
    LOCAL.with(|l| l.poller.set(Some(id)));
}

/// The id of the poller running on this thread.
pub(crate) fn current_poller() -> Option<u16> {
    LOCAL.with(|l| l.poller.get())
}

/// Queues `key` on this thread's local run queue (the caller is its poller).
pub(crate) fn push_ready(key: Key) {
    LOCAL.with(|l| l.ready.borrow_mut().push(key));
}

/// Moves this thread's locally woken keys into `into`.
pub(crate) fn take_ready(into: &mut Vec<Key>) {
    LOCAL.with(|l| into.append(&mut l.ready.borrow_mut()));
}

/// Queues a task spawned on this thread's poller.
pub(crate) fn push_spawned(task: Task) {
    LOCAL.with(|l| l.spawned.borrow_mut().push(task));
}

/// Moves the tasks spawned on this thread since the last call into `into`.
pub(crate) fn take_spawned(into: &mut Vec<Task>) {
    LOCAL.with(|l| into.append(&mut l.spawned.borrow_mut()));
}
