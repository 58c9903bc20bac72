//! torch.topk's order on the CPU, ties included, for the MoE router: which experts a token gets
//! when router probabilities tie must be the ones transformers picks.
//!
//! ATen's CPU kernel (`aten/src/ATen/native/TopKImpl.h`, `topk_impl_loop`) fills a queue of
//! (value, index) pairs in index order and, with the comparator "NaN first, then greater value",
//! runs `std::partial_sort(begin, begin + k, end)` when `k * 64 <= n`, else
//! `std::nth_element(begin, begin + k - 1, end)` followed by `std::sort(begin, begin + k - 1)`.
//! Which of two equal values wins is therefore decided by libstdc++'s algorithms (the library
//! torch's Linux wheels are built against): introselect (median-of-three pivot, unguarded
//! partition, insertion sort below four elements, heap select when the depth limit runs out) and
//! the binary-heap routines. They are re-stated here from their documented behaviour in
//! libstdc++'s `bits/stl_algo.h` / `bits/stl_heap.h`; a golden test checks the result against
//! torch.topk on tie-heavy rows (fixtures/gen/arch_moe.py, `topk`).

/// One queue entry: the value and its original index.
type Entry = (f32, usize);

/// The comparator of the `largest` branch: NaN sorts first, then greater values.
fn before(x: &Entry, y: &Entry) -> bool {
    (x.0.is_nan() && !y.0.is_nan()) || x.0 > y.0
}

/// The indices of the `k` largest values in the order torch.topk (sorted, largest) returns them
/// on the CPU. `k` is clamped to the row length.
pub(crate) fn topk_indices(values: &[f32], k: usize) -> Vec<usize> {
    let n = values.len();
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    let mut queue: Vec<Entry> = values.iter().copied().zip(0..).collect();
    if k * 64 <= n {
        heap_select(&mut queue, 0, k, n);
        sort_heap(&mut queue, 0, k);
    } else {
        nth_element(&mut queue, k - 1);
        // `std::sort` of the first k − 1: libstdc++ sorts ranges of at most 16 by insertion sort
        // alone; longer ones use introsort, whose tie order is not re-stated here (the expert set
        // is what routing depends on, and nth_element above decides it).
        insertion_sort(&mut queue, 0, k - 1);
    }
    queue[..k].iter().map(|e| e.1).collect()
}

/// `std::nth_element(begin, begin + nth, end)`: libstdc++'s introselect with depth limit
/// `2 · floor(log2(n))`.
fn nth_element(q: &mut [Entry], nth: usize) {
    let (mut first, mut last) = (0usize, q.len());
    if nth >= last {
        return;
    }
    let mut depth = 2 * (usize::BITS - 1 - last.leading_zeros()) as usize;
    while last - first > 3 {
        if depth == 0 {
            heap_select(q, first, nth + 1, last);
            q.swap(first, nth);
            return;
        }
        depth -= 1;
        let cut = partition_pivot(q, first, last);
        if cut <= nth {
            first = cut;
        } else {
            last = cut;
        }
    }
    insertion_sort(q, first, last);
}

/// Median of `first + 1`, the middle and `last − 1` moved to `first`, then the unguarded
/// partition of `first + 1..last` around it; returns the cut.
fn partition_pivot(q: &mut [Entry], first: usize, last: usize) -> usize {
    let mid = first + (last - first) / 2;
    move_median_to_first(q, first, first + 1, mid, last - 1);
    let pivot = q[first];
    let (mut lo, mut hi) = (first + 1, last);
    loop {
        while before(&q[lo], &pivot) {
            lo += 1;
        }
        hi -= 1;
        while before(&pivot, &q[hi]) {
            hi -= 1;
        }
        if lo >= hi {
            return lo;
        }
        q.swap(lo, hi);
        lo += 1;
    }
}

fn move_median_to_first(q: &mut [Entry], result: usize, a: usize, b: usize, c: usize) {
    let lt = |i: usize, j: usize, q: &[Entry]| before(&q[i], &q[j]);
    let pick = if lt(a, b, q) {
        if lt(b, c, q) {
            b
        } else if lt(a, c, q) {
            c
        } else {
            a
        }
    } else if lt(a, c, q) {
        a
    } else if lt(b, c, q) {
        c
    } else {
        b
    };
    q.swap(result, pick);
}

/// libstdc++'s insertion sort of `first..last` (stable for equal values).
fn insertion_sort(q: &mut [Entry], first: usize, last: usize) {
    if last <= first + 1 {
        return;
    }
    for i in first + 1..last {
        let value = q[i];
        if before(&value, &q[first]) {
            q.copy_within(first..i, first + 1);
            q[first] = value;
        } else {
            let mut hole = i;
            while before(&value, &q[hole - 1]) {
                q[hole] = q[hole - 1];
                hole -= 1;
            }
            q[hole] = value;
        }
    }
}

/// `std::__heap_select(first, middle, last)`: a heap of `first..middle` keeps the best seen.
fn heap_select(q: &mut [Entry], first: usize, middle: usize, last: usize) {
    make_heap(q, first, middle);
    for i in middle..last {
        if before(&q[i], &q[first]) {
            pop_heap(q, first, middle, i);
        }
    }
}

fn sort_heap(q: &mut [Entry], first: usize, mut last: usize) {
    while last - first > 1 {
        last -= 1;
        pop_heap(q, first, last, last);
    }
}

fn make_heap(q: &mut [Entry], first: usize, last: usize) {
    let len = last - first;
    if len < 2 {
        return;
    }
    let mut parent = (len - 2) / 2;
    loop {
        let value = q[first + parent];
        adjust_heap(q, first, parent, len, value);
        if parent == 0 {
            return;
        }
        parent -= 1;
    }
}

/// Moves the heap's top to `result` and re-heaps `first..last` with `result`'s old value.
fn pop_heap(q: &mut [Entry], first: usize, last: usize, result: usize) {
    let value = q[result];
    q[result] = q[first];
    adjust_heap(q, first, 0, last - first, value);
}

fn adjust_heap(q: &mut [Entry], first: usize, mut hole: usize, len: usize, value: Entry) {
    let top = hole;
    let mut child = hole;
    while child < len.saturating_sub(1) / 2 {
        child = 2 * (child + 1);
        if before(&q[first + child], &q[first + child - 1]) {
            child -= 1;
        }
        q[first + hole] = q[first + child];
        hole = child;
    }
    if len.is_multiple_of(2) && len >= 2 && child == (len - 2) / 2 {
        child = 2 * (child + 1);
        q[first + hole] = q[first + child - 1];
        hole = child - 1;
    }
    // push_heap
    let mut parent = hole.saturating_sub(1) / 2;
    while hole > top && before(&q[first + parent], &value) {
        q[first + hole] = q[first + parent];
        hole = parent;
        parent = hole.saturating_sub(1) / 2;
    }
    q[first + hole] = value;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Orders measured with torch 2.15 on the CPU (see the module doc): equal probabilities do not
    /// go to the lower index.
    #[test]
    fn ties_follow_torch_not_index_order() {
        assert_eq!(topk_indices(&[0.25, 0.25, 0.25, 0.25], 2), vec![2, 3]);
        assert_eq!(topk_indices(&[0.25, 0.25, 0.25, 0.25], 3), vec![2, 3, 0]);
        assert_eq!(topk_indices(&[0.1, 0.3, 0.3, 0.3], 2), vec![2, 3]);
        assert_eq!(topk_indices(&[0.4, 0.2, 0.2, 0.2], 2), vec![0, 2]);
        assert_eq!(topk_indices(&[0.0; 8], 2), vec![6, 5]);
        assert_eq!(topk_indices(&[0.0; 60], 4), vec![39, 40, 41, 38]);
        assert_eq!(
            topk_indices(&[0.0; 128], 8),
            vec![84, 87, 86, 85, 82, 81, 88, 83]
        );
    }

    /// Every row of `fixtures/goldens/arch_moe/topk.json` (torch.topk on tie-heavy rows, both of
    /// ATen's paths) comes out in torch's order.
    #[test]
    fn tie_heavy_rows_match_torch_topk() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/goldens/arch_moe/topk.json");
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("read topk.json"))
                .expect("parse topk.json");
        let ints = |v: &serde_json::Value| -> Vec<usize> {
            v.as_array()
                .expect("list")
                .iter()
                .map(|x| x.as_u64().expect("int") as usize)
                .collect()
        };
        let mut rows = 0;
        let mut partial_sort = 0;
        for case in doc["cases"].as_array().expect("cases") {
            let k = case["k"].as_u64().expect("k") as usize;
            let n = case["n"].as_u64().expect("n") as usize;
            for (levels, want) in case["rows"]
                .as_array()
                .expect("rows")
                .iter()
                .zip(case["indices"].as_array().expect("indices"))
            {
                let values: Vec<f32> = ints(levels).iter().map(|l| *l as f32 * 0.25).collect();
                assert_eq!(values.len(), n);
                assert_eq!(
                    topk_indices(&values, k),
                    ints(want),
                    "n {n}, k {k}: {values:?}"
                );
                rows += 1;
                partial_sort += usize::from(k * 64 <= n);
            }
        }
        assert!(
            rows >= 200 && partial_sort >= 50,
            "{rows} rows, {partial_sort} partial_sort"
        );
    }

    #[test]
    fn distinct_values_come_out_sorted() {
        let v = [0.3f32, 0.9, 0.1, 0.5, 0.7];
        assert_eq!(topk_indices(&v, 3), vec![1, 4, 3]);
        let long: Vec<f32> = (0..200).map(|i| ((i * 37) % 200) as f32).collect();
        let got = topk_indices(&long, 2);
        assert_eq!(
            got.iter().map(|i| long[*i]).collect::<Vec<_>>(),
            vec![199.0, 198.0]
        );
    }
}
