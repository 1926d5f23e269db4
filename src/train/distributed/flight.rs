//! Collectives in flight: started one after another, completed in the order started, with at
//! most a window of elements in flight at once (one larger than the window flies alone), so
//! that one bucket communicates while the next is flattened, updated or still computed.

use anyhow::Result;
use std::collections::VecDeque;

/// The collectives started and not yet completed, each with its size in elements.
pub struct Flight<T> {
    queue: VecDeque<(i64, T)>,
    elements: i64,
    limit: i64,
}

impl<T> Flight<T> {
    /// At most `limit` elements in flight.
    pub fn new(limit: i64) -> Flight<T> {
        Flight { queue: VecDeque::new(), elements: 0, limit }
    }

    /// Completes (`done`) the oldest collectives until one of `size` elements may start.
    pub fn make_room(&mut self, size: i64, mut done: impl FnMut(T) -> Result<()>) -> Result<()> {
        while !admits(self.queue.len(), self.elements, size, self.limit) {
            let (oldest, started) = self.queue.pop_front().expect("admits a collective when none is in flight");
            self.elements -= oldest;
            done(started)?;
        }
        Ok(())
    }

    /// Records a collective of `size` elements, started after [`Flight::make_room`].
    pub fn push(&mut self, size: i64, started: T) {
        self.queue.push_back((size, started));
        self.elements += size;
    }

    /// Collectives started and not yet completed.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }

    /// The most elements in flight.
    #[cfg(test)]
    pub fn limit(&self) -> i64 {
        self.limit
    }

    /// Completes every collective in flight, oldest first.
    pub fn finish(&mut self, mut done: impl FnMut(T) -> Result<()>) -> Result<()> {
        while let Some((size, started)) = self.queue.pop_front() {
            self.elements -= size;
            done(started)?;
        }
        Ok(())
    }
}

/// Whether a collective of `size` elements may start beside `flying` ones of `elements` in all:
/// within `limit`, or alone.
fn admits(flying: usize, elements: i64, size: i64, limit: i64) -> bool {
    flying == 0 || elements + size <= limit
}

/// Runs `start` on each item in order, and `done` on each in the same order, with at most `limit`
/// elements (`size`) started and not yet done.
pub fn pipelined<B, T>(items: &mut [B], size: impl Fn(&B) -> i64, limit: i64, mut start: impl FnMut(&B) -> Result<T>,
                       mut done: impl FnMut(&mut B, T) -> Result<()>) -> Result<()> {
    let mut flight = Flight::new(limit);
    for i in 0..items.len() {
        let wanted = size(&items[i]);
        flight.make_room(wanted, |(j, started)| done(&mut items[j], started))?;
        flight.push(wanted, (i, start(&items[i])?));
    }
    flight.finish(|(j, started)| done(&mut items[j], started))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipelined_collectives_stay_within_the_limit_and_finish_in_order() {
        let mut sizes = vec![15i64, 7, 16, 3];
        let events = std::cell::RefCell::new(vec![]);
        let start = |size: &i64| {
            events.borrow_mut().push(format!("start {size}"));
            Ok(*size)
        };
        pipelined(&mut sizes, |s| *s, 24, start, |_, size| {
            events.borrow_mut().push(format!("done {size}"));
            Ok(())
        })
        .unwrap();
        let want = ["start 15", "start 7", "done 15", "start 16", "done 7", "start 3", "done 16", "done 3"];
        assert_eq!(events.into_inner(), want);
        // A collective larger than the limit flies alone.
        assert!(admits(0, 0, 100, 24) && !admits(1, 3, 100, 24));
    }
}
