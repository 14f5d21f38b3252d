//! Which vector instructions the CPU kernels use, chosen at run time.
//!
//! Release builds target the baseline x86-64 (SSE2), so that one binary runs
//! on every machine. Two kinds of code use more where the processor has it:
//! the convolution tiles ([`conv`](super::conv), written with intrinsics) and
//! the memory-bound loops of the other kernels (batch norm, sums, relus,
//! updates), plain Rust declared with [`vectorized!`], which compiles one
//! body three times (baseline, AVX2+FMA, AVX-512) and calls the one [`Isa`]
//! names. Rust never fuses a multiply and an add on its own, and these
//! bodies sum across explicit lanes only, so the three give the same bits.

/// Which implementation runs. Only runtime detection makes one
/// ([`Isa::best`], [`Isa::supported`], whose first is the portable one), so a
/// SIMD variant never runs on a processor without its instructions: that is
/// what makes the `unsafe` calls into the AVX2 and AVX-512 code sound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Isa(Kind);

/// The instruction sets [`Isa`] tells apart, weakest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    /// Plain Rust, for processors without AVX2 and FMA.
    Portable,
    /// 256-bit vectors with fused multiply-add.
    Avx2Fma,
    /// [`Kind::Avx2Fma`] and 512-bit vectors (AVX-512 F, BW, DQ, VL).
    Avx512,
}

impl Isa {
    /// Every implementation this processor runs, the portable one first and the
    /// fastest last: what the tests compare against the reference.
    pub fn supported() -> Vec<Isa> {
        let mut v = vec![Isa(Kind::Portable)];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            v.push(Isa(Kind::Avx2Fma));
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl")
            {
                v.push(Isa(Kind::Avx512));
            }
        }
        v
    }

    /// The fastest implementation this processor runs, or the fastest up to
    /// `DPM_ISA` (`portable`, `avx2`, `avx512`; formerly `DPM_CONV_ISA`) when
    /// that is set: for side-by-side benchmarks and for ruling a variant out.
    pub fn best() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let var = std::env::var("DPM_ISA").or_else(|_| std::env::var("DPM_CONV_ISA"));
            Isa::capped(var.as_deref().ok())
        })
    }

    /// The fastest supported implementation up to `cap` (a `DPM_ISA` value;
    /// none, or one it does not know, caps nothing).
    fn capped(cap: Option<&str>) -> Isa {
        let cap = match cap {
            Some("portable") => Kind::Portable,
            Some("avx2") => Kind::Avx2Fma,
            _ => Kind::Avx512,
        };
        Isa::supported()
            .into_iter()
            .filter(|i| i.0 <= cap)
            .max_by_key(|i| i.0)
            .unwrap_or(Isa(Kind::Portable))
    }

    /// Whether the AVX2+FMA routines may run (also under AVX-512).
    pub(crate) fn avx2(self) -> bool {
        self.0 >= Kind::Avx2Fma
    }

    /// The instruction set, for code that picks among its variants.
    pub(crate) fn kind(self) -> Kind {
        self.0
    }
}

/// Declares `fn name(isa: Isa, args…)`: the body compiled for each
/// instruction set [`Isa`] tells apart, run as `isa` says. The body must be
/// plain safe Rust over its arguments (slices and scalars, no generics); it
/// is inlined into each variant, where the compiler vectorises its loops.
macro_rules! vectorized {
    ($(
        $(#[$meta:meta])*
        $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block
    )*) => {$(
        $(#[$meta])*
        $vis fn $name(isa: $crate::ops::cpu::isa::Isa, $($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
            fn avx512($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            match isa.kind() {
                // SAFETY: an `Isa` of these kinds exists only where runtime
                // detection found their features (see `Isa`).
                #[cfg(target_arch = "x86_64")]
                $crate::ops::cpu::isa::Kind::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                $crate::ops::cpu::isa::Kind::Avx2Fma => unsafe { avx2($($arg),*) },
                _ => body($($arg),*),
            }
        }
    )*};
}
pub(crate) use vectorized;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_lists_the_portable_variant_first_and_caps_apply() {
        let all = Isa::supported();
        assert_eq!(all[0].kind(), Kind::Portable);
        assert!(!all[0].avx2());
        // Strictly faster after it, each with the AVX2 routines.
        assert!(all.windows(2).all(|w| w[0].kind() < w[1].kind()));
        assert!(all[1..].iter().all(|i| i.avx2()));
        let fastest = *all.last().unwrap();
        assert_eq!(Isa::capped(None), fastest);
        assert_eq!(Isa::capped(Some("avx512")), fastest);
        assert_eq!(Isa::capped(Some("something else")), fastest);
        assert_eq!(Isa::capped(Some("portable")), all[0]);
        let avx2 = all.iter().copied().rfind(|i| i.kind() <= Kind::Avx2Fma);
        assert_eq!(Some(Isa::capped(Some("avx2"))), avx2);
        // Where the machine has them, the AVX2 and AVX-512 variants exist.
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            assert_eq!(all[1].kind(), Kind::Avx2Fma);
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl") {
            assert_eq!(fastest.kind(), Kind::Avx512);
        }
    }
}

/// What the tests of [`vectorized!`] functions feed every variant.
#[cfg(test)]
pub(crate) mod testing {
    use super::Isa;

    /// Lengths around the vector widths: none, less than one 4-lane vector,
    /// whole and partial 16- and 32-lane runs, and a long odd one.
    pub const LENGTHS: [usize; 8] = [0, 3, 16, 17, 32, 63, 100, 1031];

    /// `n` values in [−2, 2) from `seed`, with NaN, ±0 and a subnormal among
    /// them (one NaN payload: a result's payload is then the same whichever
    /// operand the compiler puts first).
    pub fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::ops::cpu::rng::Rng::new(seed);
        let mut v: Vec<f32> = (0..n).map(|_| (4.0 * rng.uniform() - 2.0) as f32).collect();
        for (i, special) in [f32::NAN, 0.0, -0.0, 1e-40].into_iter().enumerate() {
            if let Some(x) = v.get_mut(7 * i + seed as usize % 5) {
                *x = special;
            }
        }
        v
    }

    /// Every variant after the portable one (which the caller ran for `want`)
    /// gives `want`'s bits: `run(isa)` returns its outputs, concatenated.
    pub fn same_bits(what: &str, want: &[f32], run: impl Fn(Isa) -> Vec<f32>) {
        for isa in Isa::supported().into_iter().skip(1) {
            let got = run(isa);
            assert_eq!(got.len(), want.len(), "{what}, {isa:?}");
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{what}, {isa:?}, element {i}: {g} against {w}"
                );
            }
        }
    }

    /// A function under test, writing its output into a slice.
    pub type Writes<'a> = &'a dyn Fn(Isa, &mut [f32]);

    /// `f` writing into `n` values (from seed 9), under every variant: the
    /// same bits.
    pub fn same_bits_into(what: &str, n: usize, f: Writes<'_>) {
        let run = |isa: Isa| {
            let mut y = values(n, 9);
            f(isa, &mut y);
            y
        };
        same_bits(what, &run(portable()), run);
    }

    /// The portable variant.
    pub fn portable() -> Isa {
        Isa::supported()[0]
    }
}
