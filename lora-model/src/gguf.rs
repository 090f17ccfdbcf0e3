//! A GGUF (version 2 and 3) reader over a memory map: the header, every metadata value type (arrays
//! included), the tensor infos, the alignment and bounds-checked access to each tensor's bytes. Nothing
//! is read twice: metadata is parsed once, tensor data is dequantized straight from the map.
//!
//! Every read is bounds-checked: a truncated or corrupt file gives [`ModelError::Format`] (or
//! [`ModelError::Tensor`] naming the tensor), never a panic. Counts read from the file never size an
//! allocation beyond what the remaining bytes could hold.
//!
//! - [`llama`]: the llama (and qwen2) architecture's tensors and metadata → [`crate::ModelWeights`].
//! - [`writer`]: a small GGUF writer (tests and generated models).

pub mod llama;
pub mod writer;

use std::fs::File;
use std::path::{Path, PathBuf};

use half::bf16;
use memmap2::Mmap;

use crate::dequant::{dequantize, GgmlType};
use crate::error::ModelError;
use crate::weights::Tensor;

/// The magic at the start of every GGUF file.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// Alignment of the data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// GGUF metadata value type codes.
pub mod value_type {
    /// `uint8`.
    pub const U8: u32 = 0;
    /// `int8`.
    pub const I8: u32 = 1;
    /// `uint16`.
    pub const U16: u32 = 2;
    /// `int16`.
    pub const I16: u32 = 3;
    /// `uint32`.
    pub const U32: u32 = 4;
    /// `int32`.
    pub const I32: u32 = 5;
    /// `float32`.
    pub const F32: u32 = 6;
    /// `bool` (one byte).
    pub const BOOL: u32 = 7;
    /// `string` (u64 length + UTF-8 bytes).
    pub const STRING: u32 = 8;
    /// `array` (u32 element type, u64 count, elements).
    pub const ARRAY: u32 = 9;
    /// `uint64`.
    pub const U64: u32 = 10;
    /// `int64`.
    pub const I64: u32 = 11;
    /// `float64`.
    pub const F64: u32 = 12;
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    /// `uint8`.
    U8(u8),
    /// `int8`.
    I8(i8),
    /// `uint16`.
    U16(u16),
    /// `int16`.
    I16(i16),
    /// `uint32`.
    U32(u32),
    /// `int32`.
    I32(i32),
    /// `float32`.
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// `string`.
    Str(String),
    /// `array` of values of one type (`elem_type`, a [`value_type`] code).
    Array {
        /// The elements' type code.
        elem_type: u32,
        /// The elements.
        items: Vec<GgufValue>,
    },
    /// `uint64`.
    U64(u64),
    /// `int64`.
    I64(i64),
    /// `float64`.
    F64(f64),
}

impl GgufValue {
    /// The [`value_type`] code of this value.
    pub fn type_code(&self) -> u32 {
        use value_type as t;
        match self {
            GgufValue::U8(_) => t::U8,
            GgufValue::I8(_) => t::I8,
            GgufValue::U16(_) => t::U16,
            GgufValue::I16(_) => t::I16,
            GgufValue::U32(_) => t::U32,
            GgufValue::I32(_) => t::I32,
            GgufValue::F32(_) => t::F32,
            GgufValue::Bool(_) => t::BOOL,
            GgufValue::Str(_) => t::STRING,
            GgufValue::Array { .. } => t::ARRAY,
            GgufValue::U64(_) => t::U64,
            GgufValue::I64(_) => t::I64,
            GgufValue::F64(_) => t::F64,
        }
    }

    /// An integer value (any width, signed only if non-negative) as u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// An integer value (any width) as i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v as i64),
            GgufValue::I16(v) => Some(v as i64),
            GgufValue::I32(v) => Some(v as i64),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// A float (or integer) value as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// A string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A bool value.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// An array's elements.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array { items, .. } => Some(items),
            _ => None,
        }
    }
}

/// One tensor's entry in the header.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    /// Its name (`blk.0.attn_q.weight`, ...).
    pub name: String,
    /// Dimensions as stored: fastest-varying first (a PyTorch `[out, in]` weight is `[in, out]`).
    pub dims: Vec<u64>,
    /// Its ggml type.
    pub ggml_type: GgmlType,
    /// Offset of its data from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Shape in PyTorch order (slowest-varying first).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A GGUF file, memory-mapped, its header parsed.
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata entries in file order.
    pub metadata: Vec<(String, GgufValue)>,
    /// Tensor infos in file order.
    pub tensors: Vec<GgufTensorInfo>,
    /// `general.alignment`, or 32.
    pub alignment: u64,
    data_start: u64,
}

/// A bounds-checked little-endian cursor over the header.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, reason: String) -> ModelError {
        ModelError::Format { path: self.path.to_path_buf(), reason }
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], ModelError> {
        let left = (self.buf.len() - self.pos) as u64;
        if n > left {
            return Err(self.err(format!(
                "truncated: {what} needs {n} bytes at offset {}, the file has {} bytes",
                self.pos,
                self.buf.len()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], ModelError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, ModelError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, ModelError> {
        let n = self.u64(what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.err(format!("{what} is not valid UTF-8")))
    }

    /// Bytes left, to bound allocations sized by counts read from the file.
    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn value(&mut self, ty: u32, what: &str, depth: u32) -> Result<GgufValue, ModelError> {
        use value_type as t;
        Ok(match ty {
            t::U8 => GgufValue::U8(self.array::<1>(what)?[0]),
            t::I8 => GgufValue::I8(self.array::<1>(what)?[0] as i8),
            t::U16 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            t::I16 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            t::U32 => GgufValue::U32(self.u32(what)?),
            t::I32 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            t::F32 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            t::BOOL => match self.array::<1>(what)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(self.err(format!("{what}: bool byte {b}"))),
            },
            t::STRING => GgufValue::Str(self.string(what)?),
            t::U64 => GgufValue::U64(self.u64(what)?),
            t::I64 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            t::F64 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            t::ARRAY => {
                if depth > 4 {
                    return Err(self.err(format!("{what}: arrays nested too deep")));
                }
                let elem_type = self.u32(what)?;
                let count = self.u64(what)?;
                // Every element takes at least one byte: a count beyond the bytes left is corrupt.
                if count > self.left() as u64 {
                    return Err(
                        self.err(format!("truncated: {what} claims {count} elements, {} bytes are left", self.left()))
                    );
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem_type, what, depth + 1)?);
                }
                GgufValue::Array { elem_type, items }
            }
            other => return Err(self.err(format!("{what}: unknown metadata value type {other}"))),
        })
    }
}

impl GgufFile {
    /// Maps and parses `path`'s header.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let io = |source| ModelError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and private to this process; the file is a model the user
        // pointed at and nothing in this process writes it. (Another process truncating it while
        // mapped would fault; that is the documented limit of every memory-mapped loader.)
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, map)
    }

    fn parse(path: &Path, map: Mmap) -> Result<Self, ModelError> {
        let mut c = Cursor { buf: &map, pos: 0, path };
        let magic = c.take(4, "magic")?;
        if magic != MAGIC {
            return Err(c.err(format!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")")));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(c.err(format!("GGUF version {version} is not supported (2 or 3)")));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_meta = c.u64("metadata count")?;
        // Each metadata entry takes ≥ 13 bytes, each tensor info ≥ 24: bound the counts by the file.
        if n_meta > c.left() as u64 / 13 || n_tensors > c.left() as u64 / 24 {
            return Err(c.err(format!(
                "truncated or corrupt header: {n_meta} metadata entries and {n_tensors} tensors cannot fit in {} bytes",
                map.len()
            )));
        }
        let mut metadata = Vec::with_capacity(n_meta as usize);
        for i in 0..n_meta {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.u32(&format!("type of `{key}`"))?;
            let value = c.value(ty, &format!("metadata `{key}`"), 0)?;
            metadata.push((key, value));
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = c.string(&format!("name of tensor #{i}"))?;
            let what = format!("tensor info of `{name}`");
            let n_dims = c.u32(&what)?;
            if n_dims > 4 {
                return Err(c.err(format!("tensor `{name}` has {n_dims} dimensions (at most 4)")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&what)?);
            }
            let ggml_type = GgmlType::from_code(c.u32(&what)?);
            let offset = c.u64(&what)?;
            tensors.push(GgufTensorInfo { name, dims, ggml_type, offset });
        }
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, v)) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => return Err(c.err(format!("general.alignment {v:?} is not a power of two"))),
            },
        };
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let file = GgufFile { path: path.to_path_buf(), version, metadata, tensors, alignment, data_start, map };
        // Tensors of a type this reader cannot dequantize are refused when read (naming the tensor),
        // so a file is still usable for its metadata (tokenizer) and its other tensors.
        for t in file.tensors.iter().filter(|t| t.ggml_type.block_layout().is_some()) {
            file.tensor_range(t)?;
        }
        Ok(file)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// A string metadata value.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(GgufValue::as_str)
    }

    /// An integer metadata value; an error if present with another type.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, ModelError> {
        self.get(key).map(|v| v.as_u64().ok_or_else(|| self.bad_key(key, "a non-negative integer", v))).transpose()
    }

    /// A float (or integer) metadata value; an error if present with another type.
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>, ModelError> {
        self.get(key).map(|v| v.as_f64().ok_or_else(|| self.bad_key(key, "a number", v))).transpose()
    }

    /// A bool metadata value; an error if present with another type.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, ModelError> {
        self.get(key).map(|v| v.as_bool().ok_or_else(|| self.bad_key(key, "a bool", v))).transpose()
    }

    /// An array of strings; an error if present with another type.
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<&str>>, ModelError> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let items = v.as_array().ok_or_else(|| self.bad_key(key, "an array of strings", v))?;
        items
            .iter()
            .map(|i| i.as_str().ok_or_else(|| self.bad_key(key, "an array of strings", i)))
            .collect::<Result<_, _>>()
            .map(Some)
    }

    /// An array of integers as i64; an error if present with another type.
    pub fn get_int_array(&self, key: &str) -> Result<Option<Vec<i64>>, ModelError> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let items = v.as_array().ok_or_else(|| self.bad_key(key, "an array of integers", v))?;
        items
            .iter()
            .map(|i| i.as_i64().ok_or_else(|| self.bad_key(key, "an array of integers", i)))
            .collect::<Result<_, _>>()
            .map(Some)
    }

    fn bad_key(&self, key: &str, want: &str, got: &GgufValue) -> ModelError {
        let shown = match got {
            GgufValue::Array { items, .. } => format!("an array of {} items", items.len()),
            v => format!("{v:?}"),
        };
        ModelError::Format { path: self.path.clone(), reason: format!("metadata `{key}` should be {want}, is {shown}") }
    }

    /// A tensor's info.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    fn tensor_err(&self, name: &str, reason: String) -> ModelError {
        ModelError::Tensor { path: self.path.clone(), tensor: name.to_string(), reason }
    }

    /// Byte range of a tensor's data in the file, checked against the file's length.
    fn tensor_range(&self, t: &GgufTensorInfo) -> Result<std::ops::Range<usize>, ModelError> {
        let elements = t
            .dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| self.tensor_err(&t.name, format!("dims {:?} overflow", t.dims)))?;
        let len = t.ggml_type.bytes_for(elements).map_err(|r| self.tensor_err(&t.name, r))?;
        if !t.offset.is_multiple_of(self.alignment) {
            return Err(self.tensor_err(&t.name, format!("offset {} is not aligned to {}", t.offset, self.alignment)));
        }
        let start = self.data_start.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(len));
        match (start, end) {
            (Some(s), Some(e)) if e <= self.map.len() as u64 => Ok(s as usize..e as usize),
            _ => Err(self.tensor_err(
                &t.name,
                format!(
                    "truncated file: its {len} bytes at data offset {} end past the file's {} bytes",
                    t.offset,
                    self.map.len()
                ),
            )),
        }
    }

    /// A tensor's raw bytes.
    pub fn tensor_bytes(&self, t: &GgufTensorInfo) -> Result<&[u8], ModelError> {
        let r = self.tensor_range(t)?;
        Ok(&self.map[r])
    }

    /// A tensor dequantized to bf16, PyTorch shape; errors name the tensor and the file.
    pub fn read_tensor(&self, name: &str) -> Result<Tensor, ModelError> {
        let t = self.tensor(name).ok_or_else(|| self.tensor_err(name, "missing".into()))?;
        let bytes = self.tensor_bytes(t)?;
        let data: Vec<bf16> =
            dequantize(t.ggml_type, bytes, t.elements() as usize).map_err(|r| self.tensor_err(name, r))?;
        Ok(Tensor { name: name.to_string(), shape: t.shape(), data })
    }
}
