//! Typed device memory: [`DeviceBuffer`] owns an allocation of `len` elements of `T`; [`DevSlice`] is a
//! copyable, typed view of part of one (an address and a length), what launch arguments, copies and GEMMs
//! take; [`PinnedBuffer`] is page-locked host memory for asynchronous uploads.
//!
//! A view does not keep its buffer alive: the owner of the [`DeviceBuffer`] keeps it for as long as views
//! of it are used (the runtime and the tests allocate once and keep every buffer beside its views). The
//! raw address leaves a view only at the launch boundary ([`DevSlice::ptr`], [`DevSlice::ptr_mut`]) and
//! where the device reads addresses from memory ([`DevSlice::addr`], for tables such as `SlotWeights`).

use std::any::Any;
use std::marker::PhantomData;

use crate::error::{invalid, DeviceError};

/// A typed view of `len` elements at a device address (a host address on the emulator).
pub struct DevSlice<T> {
    addr: u64,
    len: usize,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for DevSlice<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DevSlice<T> {}

impl<T> PartialEq for DevSlice<T> {
    fn eq(&self, o: &Self) -> bool {
        self.addr == o.addr && self.len == o.len
    }
}
impl<T> Eq for DevSlice<T> {}

impl<T> std::fmt::Debug for DevSlice<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevSlice<{}>({:#x}, {})", std::any::type_name::<T>(), self.addr, self.len)
    }
}

impl<T> DevSlice<T> {
    /// The null view (a kernel's optional buffer left out, e.g. the expand's delta in direct mode).
    pub const fn null() -> Self {
        DevSlice { addr: 0, len: 0, _t: PhantomData }
    }

    pub(crate) fn from_raw(addr: u64, len: usize) -> Self {
        DevSlice { addr, len, _t: PhantomData }
    }

    /// Elements in the view.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether this is [`DevSlice::null`].
    pub fn is_null(&self) -> bool {
        self.addr == 0
    }

    /// Bytes in the view.
    pub fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }

    /// Elements `offset .. offset + len` of this view.
    pub fn at(&self, offset: usize, len: usize) -> Result<DevSlice<T>, DeviceError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => {
                Ok(DevSlice::from_raw(self.addr + (offset * std::mem::size_of::<T>()) as u64, len))
            }
            _ => invalid(format!("elements {offset}..+{len} are outside a view of {}", self.len)),
        }
    }

    /// Elements `offset ..` of this view.
    pub fn skip(&self, offset: usize) -> Result<DevSlice<T>, DeviceError> {
        match self.len.checked_sub(offset) {
            Some(rest) => self.at(offset, rest),
            None => invalid(format!("offset {offset} is past a view of {}", self.len)),
        }
    }

    /// The same bytes seen as elements of `U` (the byte length must be a multiple of `U`'s size, and the
    /// address aligned for `U`).
    pub fn cast<U>(&self) -> Result<DevSlice<U>, DeviceError> {
        let (size, align) = (std::mem::size_of::<U>(), std::mem::align_of::<U>() as u64);
        if size == 0 || !self.bytes().is_multiple_of(size) || !self.addr.is_multiple_of(align) {
            return invalid(format!("{self:?} cannot be viewed as {}", std::any::type_name::<U>()));
        }
        Ok(DevSlice::from_raw(self.addr, self.bytes() / size))
    }

    /// The address, for the device-side tables that hold addresses (e.g. `SlotWeights`).
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The address as a kernel's `*const T` parameter (the launch boundary; never dereference it on the host).
    pub fn ptr(&self) -> *const T {
        self.addr as usize as *const T
    }

    /// The address as a kernel's `*mut T` parameter (the launch boundary; never dereference it on the host).
    pub fn ptr_mut(&self) -> *mut T {
        self.addr as usize as *mut T
    }
}

/// An owned device allocation of `len` elements of `T` (16-byte aligned, zeroed at allocation). Dropping it
/// frees the memory; keep it alive while views of it, launches and graphs use it.
pub struct DeviceBuffer<T> {
    view: DevSlice<T>,
    _mem: Box<dyn Any + Send>,
}

impl<T> DeviceBuffer<T> {
    pub(crate) fn new(addr: u64, len: usize, mem: Box<dyn Any + Send>) -> Self {
        DeviceBuffer { view: DevSlice::from_raw(addr, len), _mem: mem }
    }

    /// A buffer of no elements that owns nothing (a placeholder until the real one is allocated).
    pub fn empty() -> Self {
        DeviceBuffer { view: DevSlice::null(), _mem: Box::new(()) }
    }

    /// The whole buffer as a view.
    pub fn slice(&self) -> DevSlice<T> {
        self.view
    }

    /// Elements `offset .. offset + len`.
    pub fn at(&self, offset: usize, len: usize) -> Result<DevSlice<T>, DeviceError> {
        self.view.at(offset, len)
    }

    /// Elements in the buffer.
    pub fn len(&self) -> usize {
        self.view.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.view.len == 0
    }

    /// Bytes in the buffer.
    pub fn bytes(&self) -> usize {
        self.view.bytes()
    }
}

impl<T> std::fmt::Debug for DeviceBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({:?})", self.view)
    }
}

/// Page-locked host memory of `len` elements (plain host memory on the emulator), the source of
/// asynchronous uploads. It is written through [`PinnedBuffer::as_mut_slice`]; the caller orders those
/// writes after the copies that read it (through an event) — that is the contract of
/// [`crate::Backend::copy_pinned_to_device`].
pub struct PinnedBuffer<T> {
    ptr: *mut T,
    len: usize,
    _mem: Box<dyn Any + Send>,
}

// SAFETY: the buffer owns its memory (`_mem`, which is `Send`) and `ptr` points into it; moving the buffer
// to another thread moves that ownership, like a `Vec<T>`.
unsafe impl<T: Send> Send for PinnedBuffer<T> {}

impl<T> PinnedBuffer<T> {
    /// # Safety
    /// `ptr` must point at `len` initialized elements owned by `mem`, valid while `mem` lives.
    pub(crate) unsafe fn new(ptr: *mut T, len: usize, mem: Box<dyn Any + Send>) -> Self {
        PinnedBuffer { ptr, len, _mem: mem }
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Read access.
    pub fn as_slice(&self) -> &[T] {
        // SAFETY: `new`'s contract: `len` initialized elements owned by `_mem`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The first `len` elements, or an error when the buffer is shorter (the check every pinned upload makes).
    pub fn prefix(&self, len: usize) -> Result<&[T], DeviceError> {
        self.as_slice()
            .get(..len)
            .ok_or_else(|| DeviceError::Invalid(format!("{len} elements past a pinned buffer of {}", self.len)))
    }

    /// Write access (order it after pending copies from this buffer).
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: `new`'s contract; `&mut self` makes this the only host reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}
