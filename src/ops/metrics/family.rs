//! The building blocks every series is made of: one call registers a family, and an enum that
//! labels one says its own label values beside its definition ([`Label`]).
//!
//! On the hot path nothing is looked up by label: [`ByLabel`] resolves one handle per enum value
//! at start-up, and [`ByCode`] one per HTTP status code on first use, in a lock-free slot. Every
//! label value comes from a closed set (an enum, a `u16` status code, the run-status table), so no
//! client or upstream input can grow the number of series. This module depends on nothing else in
//! the crate, so any module can label its own series without an import circle.

use std::marker::PhantomData;
use std::sync::{Arc, OnceLock};

use http::StatusCode;
use prometheus::core::Collector;
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};

/// Prefix of every series.
pub const NAMESPACE: &str = "plextera_gateway";

/// An enum whose values are the values of one label.
pub trait Label: Copy + Eq + 'static {
    /// Every value, each once.
    const ALL: &'static [Self];

    /// The label value the series carries.
    fn label(self) -> &'static str;
}

/// One handle (a counter, a histogram) per value of `L`, resolved once.
pub struct ByLabel<L, M> {
    handles: Arc<[M]>,
    _label: PhantomData<fn(L)>,
}

impl<L, M> Clone for ByLabel<L, M> {
    fn clone(&self) -> Self {
        Self {
            handles: Arc::clone(&self.handles),
            _label: PhantomData,
        }
    }
}

impl<L: Label, M> ByLabel<L, M> {
    /// Resolves the handle for each value's label.
    pub fn new(resolve: impl FnMut(&'static str) -> M) -> Self {
        Self {
            handles: L::ALL.iter().map(|value| value.label()).map(resolve).collect(),
            _label: PhantomData,
        }
    }

    /// Resolves the handle for each value.
    pub fn of(resolve: impl FnMut(L) -> M) -> Self {
        Self {
            handles: L::ALL.iter().copied().map(resolve).collect(),
            _label: PhantomData,
        }
    }

    /// The handle for `value` (`None` only for a value missing from [`Label::ALL`]).
    pub fn get(&self, value: L) -> Option<&M> {
        let index = L::ALL.iter().position(|known| *known == value)?;
        self.handles.get(index)
    }
}

/// Counters keyed by HTTP status code, resolved once per code and then read without locking.
#[derive(Clone)]
pub struct ByCode {
    family: IntCounterVec,
    /// Label values that come before `code`.
    prefix: Vec<&'static str>,
    /// A label value derived from the code, between `prefix` and the code (its class, say).
    derived: Option<fn(StatusCode) -> &'static str>,
    slots: Arc<[OnceLock<IntCounter>]>,
}

impl ByCode {
    /// The counters of `family` whose label values start with `prefix`, then the code.
    pub fn new(family: IntCounterVec, prefix: Vec<&'static str>) -> Self {
        let slots = (0..1000).map(|_| OnceLock::new()).collect();
        Self {
            family,
            prefix,
            derived: None,
            slots,
        }
    }

    /// The counters of a two-label `family`: what `derive` makes of the code, then the code.
    pub fn classed(family: IntCounterVec, derive: fn(StatusCode) -> &'static str) -> Self {
        Self {
            derived: Some(derive),
            ..Self::new(family, Vec::new())
        }
    }

    pub fn get(&self, code: StatusCode) -> &IntCounter {
        let slot = &self.slots[usize::from(code.as_u16())];
        slot.get_or_init(|| {
            let mut labels = self.prefix.clone();
            labels.extend(self.derived.map(|derive| derive(code)));
            labels.push(code.as_str());
            self.family.with_label_values(&labels)
        })
    }
}

/// Registers `collector` and hands it back.
pub fn register<C: Collector + Clone + 'static>(registry: &Registry, collector: C) -> prometheus::Result<C> {
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}

/// The options of `plextera_gateway_<name>`.
pub fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(NAMESPACE)
}

/// The options of the histogram `plextera_gateway_<name>`.
pub fn histogram_opts(name: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(name, help)
        .namespace(NAMESPACE)
        .buckets(buckets.to_vec())
}

/// Registers the histogram family `plextera_gateway_<name>` with these labels and buckets.
pub fn histograms(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
    label_names: &[&str],
) -> prometheus::Result<HistogramVec> {
    register(
        registry,
        HistogramVec::new(histogram_opts(name, help, buckets), label_names)?,
    )
}

/// Registers a counter family with one label, `label_name`, whose values are `L`'s.
pub fn counters<L: Label>(
    registry: &Registry,
    opts: Opts,
    label_name: &str,
) -> prometheus::Result<ByLabel<L, IntCounter>> {
    let family = register(registry, IntCounterVec::new(opts, &[label_name])?)?;
    Ok(ByLabel::new(|label| family.with_label_values(&[label])))
}

/// A counter family with two labels, one counter per pair of values that can happen.
pub type Grid<A, B> = ByLabel<A, ByLabel<B, Option<IntCounter>>>;

/// Registers a counter family with two labels, whose values are `A`'s and `B`'s: one counter per
/// pair for which `possible` holds, resolved at once. A pair that cannot happen is not exported at
/// all: a series that never moves only misleads a dashboard.
pub fn counter_grid<A: Label, B: Label>(
    registry: &Registry,
    opts: Opts,
    label_names: [&str; 2],
    possible: impl Fn(A, B) -> bool,
) -> prometheus::Result<Grid<A, B>> {
    let family = register(registry, IntCounterVec::new(opts, &label_names)?)?;
    Ok(ByLabel::of(|a: A| {
        ByLabel::of(|b: B| possible(a, b).then(|| family.with_label_values(&[a.label(), b.label()])))
    }))
}

/// The counter for `(a, b)` in a [`counter_grid`] (`None` for a pair that cannot happen).
pub fn grid_get<A: Label, B: Label>(grid: &Grid<A, B>, a: A, b: B) -> Option<&IntCounter> {
    grid.get(a)?.get(b)?.as_ref()
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// Every enum that labels a series calls this in its own tests: labels are distinct, valid
    /// label values.
    pub fn labels_are_distinct_and_valid<L: Label>() {
        let labels: Vec<&str> = L::ALL.iter().map(|value| value.label()).collect();
        for (index, label) in labels.iter().enumerate() {
            assert!(!labels[..index].contains(label), "{label} twice");
            assert!(
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_'),
                "{label:?}"
            );
        }
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Colour {
        Red,
        Blue,
    }

    impl Label for Colour {
        const ALL: &'static [Self] = &[Self::Red, Self::Blue];

        fn label(self) -> &'static str {
            match self {
                Self::Red => "red",
                Self::Blue => "blue",
            }
        }
    }

    #[test]
    fn each_value_counts_in_its_own_series() {
        let registry = Registry::new();
        let colours: ByLabel<Colour, IntCounter> =
            counters(&registry, opts("colours_total", "Colours."), "colour").expect("registers");
        colours.get(Colour::Blue).expect("resolved").inc_by(2);
        colours.get(Colour::Red).expect("resolved").inc();
        let families = registry.gather();
        let values: Vec<(String, f64)> = families[0]
            .get_metric()
            .iter()
            .map(|metric| {
                (
                    metric.get_label()[0].value().to_owned(),
                    metric.get_counter().get_value(),
                )
            })
            .collect();
        assert_eq!(families[0].name(), "plextera_gateway_colours_total");
        assert!(values.contains(&("blue".to_owned(), 2.0)), "{values:?}");
        assert!(values.contains(&("red".to_owned(), 1.0)), "{values:?}");
        labels_are_distinct_and_valid::<Colour>();
    }

    #[test]
    fn codes_resolve_once_each() {
        let registry = Registry::new();
        let family = register(
            &registry,
            IntCounterVec::new(opts("codes_total", "Codes."), &["cache", "code"]).expect("family"),
        )
        .expect("registers");
        let by_code = ByCode::new(family.clone(), vec!["HIT"]);
        by_code.get(StatusCode::OK).inc();
        by_code.get(StatusCode::OK).inc();
        by_code.get(StatusCode::NOT_FOUND).inc();
        assert_eq!(family.with_label_values(&["HIT", "200"]).get(), 2);
        assert_eq!(family.with_label_values(&["HIT", "404"]).get(), 1);
    }
}
