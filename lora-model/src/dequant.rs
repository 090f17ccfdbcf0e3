//! ggml tensor types and their dequantization to bf16: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K and Q6_K
//! (the block layouts of ggml's `ggml-common.h`; every block starts with its f16 scale(s)). Pure functions
//! over byte slices: the GGUF reader hands them a tensor's bytes from the memory map.

use half::{bf16, f16};

/// A ggml tensor type (the `ggml_type` code of a GGUF tensor info).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// Blocks of 32: f16 scale `d`, 32 × i8; value = d·q.
    Q8_0,
    /// Blocks of 32: f16 `d`, 16 bytes of nibbles; value = d·(q − 8).
    Q4_0,
    /// Blocks of 32: f16 `d`, f16 `m`, 16 bytes of nibbles; value = d·q + m.
    Q4_1,
    /// Super-blocks of 256: f16 `d`, f16 `dmin`, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles.
    Q4K,
    /// Super-blocks of 256: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 × i8 scales, f16 `d`.
    Q6K,
    /// Any other ggml type (kept to name it in errors).
    Other(u32),
}

impl GgmlType {
    /// The type of a ggml type code.
    pub fn from_code(code: u32) -> Self {
        match code {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            14 => GgmlType::Q6K,
            30 => GgmlType::Bf16,
            c => GgmlType::Other(c),
        }
    }

    /// The ggml type code.
    pub fn code(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q6K => 14,
            GgmlType::Bf16 => 30,
            GgmlType::Other(c) => c,
        }
    }

    /// ggml's name of the type (`Q4_1`, ...), for messages.
    pub fn name(self) -> String {
        const NAMES: [&str; 31] = [
            "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K",
            "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS",
            "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16",
        ];
        let c = self.code() as usize;
        NAMES.get(c).map_or_else(|| format!("type {c}"), |n| n.to_string())
    }

    /// `(elements per block, bytes per block)` of a supported type, `None` otherwise.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        match self {
            GgmlType::F32 => Some((1, 4)),
            GgmlType::F16 | GgmlType::Bf16 => Some((1, 2)),
            GgmlType::Q8_0 => Some((32, 34)),
            GgmlType::Q4_0 => Some((32, 18)),
            GgmlType::Q4_1 => Some((32, 20)),
            GgmlType::Q4K => Some((256, 144)),
            GgmlType::Q6K => Some((256, 210)),
            GgmlType::Other(_) => None,
        }
    }

    /// Bytes that `elements` values of this type take, or an error naming why not.
    pub fn bytes_for(self, elements: u64) -> Result<u64, String> {
        let (block, bytes) = self.block_layout().ok_or_else(|| format!("unsupported ggml type {}", self.name()))?;
        if !elements.is_multiple_of(block as u64) {
            return Err(format!("{elements} elements is not a multiple of the {} block of {block}", self.name()));
        }
        (elements / block as u64).checked_mul(bytes as u64).ok_or_else(|| format!("{elements} elements overflow"))
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes `elements` values of type `ty` from `bytes` (exactly [`GgmlType::bytes_for`] long) to
/// bf16 (round to nearest even). Errors on an unsupported type or a length mismatch.
pub fn dequantize(ty: GgmlType, bytes: &[u8], elements: usize) -> Result<Vec<bf16>, String> {
    let want = ty.bytes_for(elements as u64)?;
    if bytes.len() as u64 != want {
        return Err(format!("{} bytes for {elements} {} values, expected {want}", bytes.len(), ty.name()));
    }
    let mut out = Vec::with_capacity(elements);
    match ty {
        GgmlType::F32 => {
            out.extend(bytes.chunks_exact(4).map(|c| bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))))
        }
        GgmlType::F16 => {
            out.extend(bytes.chunks_exact(2).map(|c| bf16::from_f32(f16::from_le_bytes([c[0], c[1]]).to_f32())))
        }
        GgmlType::Bf16 => out.extend(bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]))),
        GgmlType::Q8_0 => {
            for blk in bytes.chunks_exact(34) {
                let d = f16_at(blk, 0);
                out.extend(blk[2..].iter().map(|&q| bf16::from_f32(d * (q as i8) as f32)));
            }
        }
        GgmlType::Q4_0 => {
            for blk in bytes.chunks_exact(18) {
                let d = f16_at(blk, 0);
                let qs = &blk[2..];
                out.extend(qs.iter().map(|&q| bf16::from_f32(d * ((q & 0xF) as f32 - 8.0))));
                out.extend(qs.iter().map(|&q| bf16::from_f32(d * ((q >> 4) as f32 - 8.0))));
            }
        }
        GgmlType::Q4_1 => {
            for blk in bytes.chunks_exact(20) {
                let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                let qs = &blk[4..];
                out.extend(qs.iter().map(|&q| bf16::from_f32(d * (q & 0xF) as f32 + m)));
                out.extend(qs.iter().map(|&q| bf16::from_f32(d * (q >> 4) as f32 + m)));
            }
        }
        GgmlType::Q4K => bytes.chunks_exact(144).for_each(|blk| dequant_q4k_block(blk, &mut out)),
        GgmlType::Q6K => bytes.chunks_exact(210).for_each(|blk| dequant_q6k_block(blk, &mut out)),
        GgmlType::Other(_) => return Err(format!("unsupported ggml type {}", ty.name())),
    }
    Ok(out)
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K super-block (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    if j < 4 {
        ((q[j] & 63) as f32, (q[j + 4] & 63) as f32)
    } else {
        let d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        let m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        (d as f32, m as f32)
    }
}

fn dequant_q4k_block(blk: &[u8], out: &mut Vec<bf16>) {
    let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
    let scales = &blk[4..16];
    let qs = &blk[16..144];
    for (chunk, q) in qs.chunks_exact(32).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, d2, m1, m2) = (d * sc1, d * sc2, dmin * m1, dmin * m2);
        out.extend(q.iter().map(|&v| bf16::from_f32(d1 * (v & 0xF) as f32 - m1)));
        out.extend(q.iter().map(|&v| bf16::from_f32(d2 * (v >> 4) as f32 - m2)));
    }
}

fn dequant_q6k_block(blk: &[u8], out: &mut Vec<bf16>) {
    let (ql_all, qh_all, sc_all) = (&blk[0..128], &blk[128..192], &blk[192..208]);
    let d = f16_at(blk, 208);
    for half in 0..2 {
        let (ql, qh, sc) = (&ql_all[64 * half..], &qh_all[32 * half..], &sc_all[8 * half..]);
        let mut y = [0f32; 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
        out.extend(y.iter().map(|&v| bf16::from_f32(v)));
    }
}

/// Quantizes f32 values to Q8_0 blocks (ggml's reference rounding: d = max|x|/127, q = round(x/d)), for
/// writing test files. `values.len()` must be a multiple of 32.
pub fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / 32 * 34);
    for blk in values.chunks(32) {
        let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(blk.iter().map(|v| (v * id).round() as i8 as u8));
    }
    out
}

/// Quantizes f32 values to Q4_1 blocks (ggml's reference: m = min, d = (max − min)/15,
/// q = round((x − m)/d) clamped to 0..=15), for writing test files. Length a multiple of 32.
pub fn quantize_q4_1(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / 32 * 20);
    for blk in values.chunks(32) {
        let min = blk.iter().copied().fold(f32::INFINITY, f32::min);
        let max = blk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
        let q = |x: f32| (((x - min) * id).round() as i32).clamp(0, 15) as u8;
        out.extend((0..16).map(|i| q(blk[i]) | (q(blk[i + 16]) << 4)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_nibble_order_low_first() {
        // One Q4_0 block, d = 1: byte j = (lo = j % 16, hi = 15 - j % 16).
        let mut blk = f16::from_f32(1.0).to_le_bytes().to_vec();
        blk.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let v: Vec<f32> = dequantize(GgmlType::Q4_0, &blk, 32).unwrap().iter().map(|x| x.to_f32()).collect();
        for j in 0..16 {
            assert_eq!(v[j], j as f32 - 8.0);
            assert_eq!(v[16 + j], (15 - j) as f32 - 8.0);
        }
    }

    #[test]
    fn q8_0_and_q4_1_round_trip_within_a_step() {
        let x: Vec<f32> = (0..64).map(|i| ((i * 37 % 64) as f32 - 30.0) / 7.0).collect();
        let q8 = dequantize(GgmlType::Q8_0, &quantize_q8_0(&x), 64).unwrap();
        let q4 = dequantize(GgmlType::Q4_1, &quantize_q4_1(&x), 64).unwrap();
        for i in 0..64 {
            assert!((q8[i].to_f32() - x[i]).abs() < 0.05, "q8 {i}");
            assert!((q4[i].to_f32() - x[i]).abs() < 0.35, "q4 {i}");
        }
    }

    #[test]
    fn length_and_type_errors() {
        assert!(dequantize(GgmlType::Q8_0, &[0; 33], 32).unwrap_err().contains("expected 34"));
        assert!(dequantize(GgmlType::Q8_0, &[0; 34], 31).unwrap_err().contains("multiple"));
        assert!(dequantize(GgmlType::from_code(13), &[], 0).unwrap_err().contains("Q5_K"));
    }
}
