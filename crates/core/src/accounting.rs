//! Privacy accounting: what a contract's guarantee buys, in the units the guard charges.
//!
//! The guard's mechanisms are zero-concentrated differentially private (ρ-zCDP, Bun and Steinke
//! 2016) with the retailer member as the unit: the discrete Gaussian with variance σ² on a query
//! of L2 sensitivity Δ is (Δ²/2σ²)-zCDP (Canonne, Kamath and Steinke 2020, Theorem 14), and
//! zCDP composes by adding ρ. A contract states its guarantee as (ε, δ) per period; this module
//! turns that into a ρ budget for the period and a fixed ρ cost per fresh answer, and back into
//! the (ε, δ) a lawyer reads.
//!
//! δ is split in two halves:
//! - one half converts the period's total ρ into (ε, δ/2)-DP (CKS 2020, Proposition 12, the
//!   tight conversion);
//! - the other half pays for the hard k: a row is released only if its true count is at least k
//!   *and* its noisy count clears k + τ. The hard k is a rule on exact data; it changes an output
//!   only when a row one member away from k clears k + τ, which happens with probability at most
//!   `rows_per_member × P(Z ≥ τ)` per answer. τ is chosen so that every answer of the period
//!   together stays within δ/2 (see `docs/privacy.md`).
//!
//! Floating point is used here only for accounting and reporting, never for sampling. Every
//! search below errs on the side of a smaller ρ budget (or a larger ε), never the other way.

use crate::{Error, Result};

/// Iterations of each bisection: enough for full f64 precision on every range used here.
const BISECTION_STEPS: usize = 200;

/// The smallest δ such that ρ-zCDP implies (ε, δ)-DP, by the tight conversion of Canonne,
/// Kamath and Steinke (2020, Proposition 12):
/// δ = inf over α > 1 of exp((α−1)(αρ−ε)) / (α−1) · (1 − 1/α)^α.
/// Any α gives a valid bound, so an imprecise search only overstates δ.
pub fn cdp_delta(rho: f64, epsilon: f64) -> f64 {
    if rho <= 0.0 {
        return 0.0;
    }
    // The optimum solves (2α−1)ρ − ε + ln(1 − 1/α) = 0; the left side increases with α.
    let (mut low, mut high) = (1.0001_f64, (epsilon + 1.0) / (2.0 * rho) + 2.0);
    for _ in 0..BISECTION_STEPS {
        let alpha = (low + high) / 2.0;
        let derivative = (2.0 * alpha - 1.0) * rho - epsilon + (-1.0 / alpha).ln_1p();
        if derivative < 0.0 {
            low = alpha;
        } else {
            high = alpha;
        }
    }
    let alpha = (low + high) / 2.0;
    let delta = ((alpha - 1.0) * (alpha * rho - epsilon) + alpha * (-1.0 / alpha).ln_1p()).exp()
        / (alpha - 1.0);
    delta.min(1.0)
}

/// The smallest ε such that ρ-zCDP implies (ε, δ)-DP.
pub fn cdp_epsilon(rho: f64, delta: f64) -> f64 {
    if rho <= 0.0 || delta >= 1.0 {
        return 0.0;
    }
    // The standard bound ρ + 2√(ρ ln(1/δ)) always holds: start from it.
    let (mut low, mut high) = (0.0_f64, rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt());
    for _ in 0..BISECTION_STEPS {
        let epsilon = (low + high) / 2.0;
        if cdp_delta(rho, epsilon) <= delta {
            high = epsilon;
        } else {
            low = epsilon;
        }
    }
    high
}

/// The largest ρ such that ρ-zCDP implies (ε, δ)-DP.
pub fn cdp_rho(epsilon: f64, delta: f64) -> f64 {
    let (mut low, mut high) = (0.0_f64, epsilon + 1.0);
    for _ in 0..BISECTION_STEPS {
        let rho = (low + high) / 2.0;
        if cdp_delta(rho, epsilon) <= delta {
            low = rho;
        } else {
            high = rho;
        }
    }
    low
}

/// A guarantee's settings, exactly (ε and δ by their bits).
type Settings = (u64, u64, u32, u32);

/// Guarantees computed so far. Converting (ε, δ) to ρ and back is a numeric search of thousands of
/// logarithms, which every question (a stored repeat too) would otherwise repeat; contracts have
/// few distinct settings, and a changed one is simply computed anew.
static COMPUTED: std::sync::Mutex<Vec<(Settings, Guarantee)>> = std::sync::Mutex::new(Vec::new());

/// Settings kept at most; beyond, the oldest is forgotten.
const KEPT_GUARANTEES: usize = 64;

fn computed(settings: Settings) -> Option<Guarantee> {
    let known = COMPUTED.lock().unwrap_or_else(|e| e.into_inner());
    known.iter().find(|(s, _)| *s == settings).map(|(_, g)| *g)
}

fn remember(settings: Settings, guarantee: Guarantee) {
    let mut known = COMPUTED.lock().unwrap_or_else(|e| e.into_inner());
    if known.len() >= KEPT_GUARANTEES {
        known.remove(0);
    }
    known.push((settings, guarantee));
}

/// A contract's guarantee, and what it makes each answer cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Guarantee {
    /// ε of everything one partner receives over one period.
    pub epsilon: f64,
    /// δ of everything one partner receives over one period.
    pub delta: f64,
    /// The period, in days (a rolling window).
    pub period_days: u32,
    /// Fresh answers the period's budget pays for; repeats are free.
    pub answers_per_period: u32,
    /// The period's zCDP budget.
    pub rho_period: f64,
    /// What one fresh answer costs (audience check, member counts and metrics together).
    pub rho_answer: f64,
    /// One answer alone, as (ε, δ)-DP.
    pub answer_epsilon: f64,
    /// One answer alone, as (ε, δ)-DP (its hard-k share included).
    pub answer_delta: f64,
    /// The probability, per answer, that the hard k changes an output: `rows_per_member × P(Z ≥ τ)`
    /// must stay below it.
    pub hard_k_delta_per_answer: f64,
}

impl Guarantee {
    /// The guarantee (ε, δ) per `period_days`, paid out as `answers_per_period` equal answers.
    pub fn new(
        epsilon: f64,
        delta: f64,
        period_days: u32,
        answers_per_period: u32,
    ) -> Result<Self> {
        let valid = epsilon.is_finite()
            && (0.01..=50.0).contains(&epsilon)
            && delta.is_finite()
            && delta > 0.0
            && delta <= 1e-3
            && (1..=crate::rules::MAX_WINDOW_DAYS).contains(&period_days)
            && (1..=10_000).contains(&answers_per_period);
        if !valid {
            return Err(Error::Config(format!(
                "need 0.01 <= epsilon <= 50, 0 < delta <= 0.001, 1 <= period_days <= {} and \
                 1 <= answers_per_period <= 10000",
                crate::rules::MAX_WINDOW_DAYS
            )));
        }
        let settings = (
            epsilon.to_bits(),
            delta.to_bits(),
            period_days,
            answers_per_period,
        );
        if let Some(known) = computed(settings) {
            return Ok(known);
        }
        let rho_period = cdp_rho(epsilon, delta / 2.0);
        let answers = f64::from(answers_per_period);
        let rho_answer = rho_period / answers;
        let hard_k_delta_per_answer = delta / 2.0 / answers;
        let guarantee = Self {
            epsilon,
            delta,
            period_days,
            answers_per_period,
            rho_period,
            rho_answer,
            answer_epsilon: cdp_epsilon(rho_answer, hard_k_delta_per_answer),
            answer_delta: 2.0 * hard_k_delta_per_answer,
            hard_k_delta_per_answer,
        };
        remember(settings, guarantee);
        Ok(guarantee)
    }

    /// How one answer's ρ is shared: a small part for the audience check, the rest evenly between
    /// the member counts and each metric that is not itself the member count.
    pub fn split(&self, noisy_metrics: usize) -> Split {
        let audience = self.rho_answer * AUDIENCE_SHARE;
        let rest = self.rho_answer - audience;
        let parts = noisy_metrics as f64 + 1.0;
        Split {
            audience,
            count: rest / parts,
            metric: rest / parts,
        }
    }
}

/// The noise behind one answer: discrete Gaussian variances for each mechanism, and the margin
/// above k that a row's noisy count must clear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoisePlan {
    /// The most rows one member counts in.
    pub rows_per_member: u32,
    /// σ² of the audience count (sensitivity 1).
    pub audience: u64,
    /// σ² of each cell's member count (L2 sensitivity √rows).
    pub count: u64,
    /// σ² of each noisy metric, in the order given (L2 sensitivity bound × √rows).
    pub metrics: Vec<u64>,
    /// τ: a row is released only if its noisy member count reaches k + τ.
    pub margin: u64,
}

impl Guarantee {
    /// The noise that makes one answer cost exactly its share, for a query whose members count
    /// in at most `rows_per_member` rows and whose noisy metrics have these per-member bounds.
    /// Every product is checked: a bound too large to noise is an error, never a silent zero.
    pub fn noise_plan(&self, rows_per_member: u32, metric_bounds: &[u64]) -> Result<NoisePlan> {
        let split = self.split(metric_bounds.len());
        let rows = u128::from(rows_per_member.max(1));
        let audience = gaussian_variance(1, split.audience)?;
        let count = gaussian_variance(rows, split.count)?;
        let metrics = metric_bounds
            .iter()
            .map(|b| {
                let b = u128::from(*b);
                let sensitivity_sq = b
                    .checked_mul(b)
                    .and_then(|b2| b2.checked_mul(rows))
                    .ok_or_else(|| Error::Config("a metric bound overflows".into()))?;
                gaussian_variance(sensitivity_sq, split.metric)
            })
            .collect::<Result<Vec<u64>>>()?;
        Ok(NoisePlan {
            rows_per_member: rows_per_member.max(1),
            audience,
            count,
            metrics,
            margin: threshold_margin(count, rows_per_member, self.hard_k_delta_per_answer),
        })
    }
}

/// The part of each answer's ρ that pays for the audience check (one count, sensitivity 1).
const AUDIENCE_SHARE: f64 = 0.05;

/// One answer's ρ, by mechanism.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Split {
    /// The matched, consenting audience's noisy size.
    pub audience: f64,
    /// The noisy member count of every cell of the output domain.
    pub count: f64,
    /// Each other metric's noisy value in every cell.
    pub metric: f64,
}

/// The discrete Gaussian variance σ² (a whole number, rounded up) that makes a query whose L2
/// sensitivity squared is `sensitivity_sq` cost at most `rho`: σ² ≥ Δ²/(2ρ). Rounding up only adds
/// noise. Refused when σ² would exceed [`MAX_VARIANCE`]: a bound that large would release no
/// insight, and the sampler's exact arithmetic is sized for it.
pub fn gaussian_variance(sensitivity_sq: u128, rho: f64) -> Result<u64> {
    if !(rho.is_finite() && rho > 0.0) || sensitivity_sq == 0 {
        return Err(Error::Config(
            "a noise scale needs a positive cost and bound".into(),
        ));
    }
    let variance = (sensitivity_sq as f64 / (2.0 * rho)).ceil();
    if !(variance.is_finite() && variance <= MAX_VARIANCE as f64) {
        return Err(Error::Config(format!(
            "the noise this needs (σ² = {variance:.3e}) is beyond the guard's limit of {MAX_VARIANCE:.0e}: \
             lower the metric's per-member bound or rows per member"
        )));
    }
    Ok((variance as u64).max(1))
}

/// The largest discrete Gaussian variance the guard samples (σ ≈ 3.2 × 10⁷).
pub const MAX_VARIANCE: u64 = 1_000_000_000_000_000;

/// The smallest margin τ ≥ 0 with `rows_per_member × P(Z ≥ τ) ≤ budget` for Z discrete Gaussian
/// with variance σ². Uses the sub-Gaussian tail P(Z ≥ t) ≤ exp(−t²/2σ²) (CKS 2020, Corollary 9),
/// which holds for every t ≥ 0 and errs on the safe side.
pub fn threshold_margin(variance: u64, rows_per_member: u32, budget: f64) -> u64 {
    let per_row = budget / f64::from(rows_per_member.max(1));
    let tau = (2.0 * variance as f64 * (1.0 / per_row).ln()).sqrt();
    tau.ceil() as u64
}

/// The half-width w of an interval that holds the true value with probability at least 95 %:
/// P(|Z| > w) ≤ 0.05 for Z discrete Gaussian with variance σ², computed from its mass function
/// for σ ≤ 10⁴ and from the continuous bound P(Z ≥ m) ≤ P(N(0, σ²) ≥ m − 1) (CKS 2020,
/// Proposition 25) above that.
pub fn interval95(variance: u64) -> u64 {
    let sigma = (variance as f64).sqrt();
    if sigma > 10_000.0 {
        return (1.959_964 * sigma).ceil() as u64 + 1;
    }
    let span = (12.0 * sigma).ceil() as i64 + 2;
    let mass = |x: i64| (-(x as f64).powi(2) / (2.0 * variance as f64)).exp();
    let total: f64 = (-span..=span).map(mass).sum();
    let mut inside = mass(0);
    let mut w = 0i64;
    while inside / total < 0.95 {
        w += 1;
        inside += 2.0 * mass(w);
    }
    w as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversion_matches_the_published_figures() {
        // For ρ = 0.025 and ε = 1 the standard bound exp(−(ε−ρ)²/4ρ) is 1.2e-4; the tight one
        // is two orders of magnitude smaller, and ε(δ = 1e-6) is below the standard ε.
        let delta = cdp_delta(0.025, 1.0);
        let standard = (-(0.975f64.powi(2)) / 0.1).exp();
        assert!(
            delta > 0.0 && delta < standard / 50.0,
            "{delta} vs {standard}"
        );
        let epsilon = cdp_epsilon(0.025, 1e-6);
        let standard = 0.025 + 2.0 * (0.025f64 * (1e6f64).ln()).sqrt();
        assert!(
            epsilon < standard && epsilon > 0.5,
            "{epsilon} vs {standard}"
        );
    }

    #[test]
    fn rho_and_epsilon_invert_each_other() {
        for (epsilon, delta) in [(1.0, 1e-6), (4.0, 1e-7), (8.0, 5e-7)] {
            let rho = cdp_rho(epsilon, delta);
            let back = cdp_epsilon(rho, delta);
            assert!(
                (back - epsilon).abs() < 1e-6,
                "{epsilon} -> {rho} -> {back}"
            );
            assert!(cdp_delta(rho, epsilon) <= delta);
        }
    }

    #[test]
    fn a_guarantee_divides_into_answers() {
        let g = Guarantee::new(6.0, 1e-6, 30, 40).unwrap();
        assert!((g.rho_answer * 40.0 - g.rho_period).abs() < 1e-12);
        assert!(g.answer_epsilon < g.epsilon);
        assert!((g.answer_delta * 40.0 - g.delta).abs() < 1e-18);
        let split = g.split(1);
        let total = split.audience + split.count + split.metric;
        assert!((total - g.rho_answer).abs() < 1e-12);
    }

    #[test]
    fn noise_plans_are_checked() {
        let g = Guarantee::new(6.0, 1e-6, 30, 40).unwrap();
        let plan = g.noise_plan(8, &[30_000]).unwrap();
        assert!(plan.metrics[0] > plan.count * 30_000u64.pow(2) / 2);
        assert!(plan.margin > 0);
        assert!(
            g.noise_plan(8, &[u64::MAX]).is_err(),
            "overflow is an error"
        );
        assert!(
            g.noise_plan(64, &[10_000_000_000]).is_err(),
            "out of range is an error"
        );
    }

    #[test]
    fn a_remembered_guarantee_is_the_one_its_settings_compute() {
        let first = Guarantee::new(3.0, 1e-7, 30, 40).unwrap();
        let other = Guarantee::new(3.0, 1e-7, 30, 41).unwrap();
        assert_ne!(
            first, other,
            "settings one answer apart must not share an entry"
        );
        assert_eq!(Guarantee::new(3.0, 1e-7, 30, 40).unwrap(), first);
        assert_eq!(first.rho_answer, cdp_rho(3.0, 0.5e-7) / 40.0);
    }

    #[test]
    fn bad_guarantees_are_refused() {
        assert!(Guarantee::new(0.0, 1e-6, 30, 10).is_err());
        assert!(Guarantee::new(f64::NAN, 1e-6, 30, 10).is_err());
        assert!(Guarantee::new(1.0, 0.5, 30, 10).is_err());
        assert!(Guarantee::new(1.0, 1e-6, 0, 10).is_err());
        assert!(Guarantee::new(1.0, 1e-6, 30, 0).is_err());
    }

    #[test]
    fn variances_round_up_and_refuse_what_they_cannot_hold() {
        // Δ² = 8 (8 rows per member), ρ = 0.5: σ² = 8.
        assert_eq!(gaussian_variance(8, 0.5).unwrap(), 8);
        assert_eq!(gaussian_variance(9, 0.5).unwrap(), 9);
        assert_eq!(gaussian_variance(1, 0.3).unwrap(), 2);
        assert!(gaussian_variance(u128::MAX, 0.01).is_err());
        assert!(gaussian_variance(1, 0.0).is_err());
        assert!(gaussian_variance(0, 1.0).is_err());
    }

    #[test]
    fn the_margin_bounds_the_tail() {
        let variance = 100;
        let tau = threshold_margin(variance, 8, 1e-8);
        let tail = (-(tau as f64).powi(2) / (2.0 * variance as f64)).exp();
        assert!(8.0 * tail <= 1e-8);
        let smaller = (-((tau - 1) as f64).powi(2) / (2.0 * variance as f64)).exp();
        assert!(8.0 * smaller > 1e-8, "τ is the smallest such margin");
    }

    #[test]
    fn intervals_cover_95_percent() {
        // A continuous Gaussian's 95 % half-width is 1.96σ; the discrete one is close.
        assert_eq!(interval95(1), 2);
        let w = interval95(10_000);
        assert!((196..=197).contains(&w), "{w}");
        let big = interval95(1_000_000_000_000);
        assert_eq!(big, 1_959_965);
    }
}
