//! Summary statistics for the experiments, as the thesis reports them (chapter 5): mean,
//! standard deviation, 95% confidence interval of the mean, median and percentiles, and the
//! difference of two sets' means (Welch) and medians.

use serde::Serialize;

/// Two-sided 95% critical values of Student's t for 1..=30 degrees of freedom.
const T_95: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
    2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
    2.052, 2.048, 2.045, 2.042,
];

/// Student's t for a two-sided 95% interval with `df` degrees of freedom (the normal 1.96
/// beyond 30, where the table stops; at most 2% off there).
pub fn t_95(df: f64) -> f64 {
    if df.is_nan() || df < 1.0 {
        return f64::NAN;
    }
    let whole = df.floor() as usize;
    if whole > T_95.len() {
        return 1.96 + (T_95[T_95.len() - 1] - 1.96) * 30.0 / df;
    }
    T_95[whole - 1]
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    /// Sample standard deviation (n - 1).
    pub std_dev: f64,
    /// Half-width of the 95% confidence interval of the mean.
    pub ci95: f64,
    pub median: f64,
    /// Nearest-rank 95th percentile.
    pub p95: f64,
}

/// The `p`-th percentile (0..=100) by nearest rank.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of `values` in any order (the mean of the middle two for an even count).
pub fn median_of(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    median(&sorted)
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

impl Summary {
    /// `None` for no values.
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let mean = sorted.iter().sum::<f64>() / n as f64;
        let std_dev = if n > 1 {
            (sorted.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        let ci95 = if n > 1 {
            t_95((n - 1) as f64) * std_dev / (n as f64).sqrt()
        } else {
            f64::NAN
        };
        Some(Self {
            n,
            min: sorted[0],
            max: sorted[n - 1],
            mean,
            std_dev,
            ci95,
            median: median(&sorted),
            p95: percentile(&sorted, 95.0),
        })
    }
}

/// How a second set of values (with a failure) differs from a first (without).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Difference {
    /// Mean of the second minus mean of the first.
    pub mean: f64,
    /// Half-width of the 95% confidence interval of that difference (Welch's t: the two sets'
    /// variances differ).
    pub mean_ci95: f64,
    /// Median of the second minus median of the first.
    pub median: f64,
}

impl Difference {
    pub fn between(first: &Summary, second: &Summary) -> Self {
        let (v1, v2) = (
            first.std_dev.powi(2) / first.n as f64,
            second.std_dev.powi(2) / second.n as f64,
        );
        let se = (v1 + v2).sqrt();
        // Welch-Satterthwaite degrees of freedom.
        let df = (v1 + v2).powi(2)
            / (v1.powi(2) / (first.n as f64 - 1.0) + v2.powi(2) / (second.n as f64 - 1.0));
        let mean_ci95 = if se == 0.0 { 0.0 } else { t_95(df) * se };
        Self {
            mean: second.mean - first.mean,
            mean_ci95,
            median: second.median - first.median,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-3
    }

    #[test]
    fn summary_of_a_known_sample() {
        let s = Summary::of(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]).unwrap();
        assert_eq!(
            (s.n, s.min, s.max, s.mean, s.median),
            (8, 2.0, 9.0, 5.0, 4.5)
        );
        assert!(close(s.std_dev, 2.138));
        // t(7) = 2.365: 2.365 * 2.138 / sqrt(8).
        assert!(close(s.ci95, 1.788), "{}", s.ci95);
        assert_eq!(s.p95, 9.0);
        assert_eq!(Summary::of(&[]), None);
        let one = Summary::of(&[3.0]).unwrap();
        assert_eq!((one.std_dev, one.median, one.p95), (0.0, 3.0, 3.0));
        assert!(one.ci95.is_nan());
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        let s = Summary::of(&v).unwrap();
        assert_eq!(s.p95, 19.0);
        assert_eq!(s.median, 10.5);
    }

    #[test]
    fn welch_difference_of_means_and_medians() {
        let a = Summary::of(&[10.0, 11.0, 12.0, 13.0, 14.0]).unwrap();
        let b = Summary::of(&[12.0, 14.0, 16.0, 18.0, 20.0]).unwrap();
        let d = Difference::between(&a, &b);
        assert_eq!((d.mean, d.median), (4.0, 4.0));
        // se = sqrt(2.5/5 + 10/5) = 1.581; df = 2.5^2 / (0.25/4 + 4/4) = 5.88 -> t(5) = 2.571.
        assert!(close(d.mean_ci95, 2.571 * 1.5811), "{}", d.mean_ci95);
        let same = Difference::between(&a, &a);
        assert_eq!(same.mean, 0.0);
    }

    #[test]
    fn t_values_approach_the_normal() {
        assert_eq!(t_95(1.0), 12.706);
        assert_eq!(t_95(9.5), 2.262);
        assert!(t_95(1000.0) > 1.96 && t_95(1000.0) < 1.97);
        assert!(t_95(0.5).is_nan());
    }
}
