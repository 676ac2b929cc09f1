//! One QuickJS runtime with ThingsBoard's script environment, its limits
//! and a cache of compiled functions.
//!
//! A `JsRuntime` is not `Send`: it lives on one worker thread for its whole
//! life and is reused call after call. Scripts are compiled once per
//! source version and kept as persistent functions. Each call runs under a
//! deadline (an interrupt handler) and the runtime under a memory limit;
//! after a timeout or an out-of-memory error the runtime is rebuilt, since
//! QuickJS state after an interrupted script is not to be trusted.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant};

use rquickjs::context::EvalOptions;
use rquickjs::{qjs, Context, Ctx, Function, Object, Persistent, Runtime, Value};

/// Limits applied to every script call.
#[derive(Debug, Clone, Copy)]
pub struct JsLimits {
    pub call_timeout: Duration,
    pub memory_limit_bytes: usize,
    /// Largest result, as JSON text, a call may return.
    pub max_result_bytes: usize,
}

/// Why a script call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JsError {
    #[error("script does not compile: {0}")]
    Compile(String),
    #[error("script threw: {0}")]
    Thrown(String),
    #[error("script ran longer than {0:?} and was stopped")]
    Timeout(Duration),
    /// QuickJS throws `null` when it cannot even allocate the error, so a
    /// script that itself throws `null` is reported the same way.
    #[error("script exceeded the memory limit of {0} MiB (or threw null) and was stopped")]
    OutOfMemory(usize),
    #[error("script result is not JSON-serialisable: {0}")]
    Result(String),
}

/// An argument passed to a script function.
pub enum JsArg<'a> {
    /// Bytes, given to the script as a real Array of numbers (0..255).
    Bytes(&'a [u8]),
    /// A string map, given as a plain object of strings.
    StringMap(&'a BTreeMap<String, String>),
    /// A JSON text, parsed in the script's context.
    Json(&'a str),
    /// A Kinesis record's metadata object: integrationName, streamName,
    /// shardId, partitionKey, sequenceNumber, approximateArrivalTimestamp.
    RecordMetadata(&'a crate::delivery::SourceRecord),
    Str(&'a str),
}

/// Globals every script sees, as in ThingsBoard's script runtime. A script
/// that defines its own `decodeToString`/`decodeToJson` shadows these.
const PRELUDE: &str = r#"
(function (global) {
  var fromCharCode = String.fromCharCode;
  var apply = Function.prototype.apply;
  var CHUNK = 8192;
  // QuickJS refuses apply() with more than 65535 arguments; Node does not.
  // Converters call String.fromCharCode.apply(String, payload) on whole
  // payloads, so that one call is chunked to keep Node's behaviour.
  Object.defineProperty(Function.prototype, 'apply', {
    value: function (thisArg, args) {
      if (this === fromCharCode && args != null && args.length > CHUNK) {
        var out = '';
        for (var i = 0; i < args.length; i += CHUNK) {
          out += apply.call(fromCharCode, null, Array.prototype.slice.call(args, i, i + CHUNK));
        }
        return out;
      }
      return apply.call(this, thisArg, args);
    },
    writable: true, configurable: true, enumerable: false
  });
  function bytesToString(bytes) {
    var out = '';
    for (var i = 0; i < bytes.length; i += CHUNK) {
      out += apply.call(fromCharCode, null, Array.prototype.slice.call(bytes, i, i + CHUNK));
    }
    return out;
  }
  global.decodeToString = function (payload) { return bytesToString(payload); };
  global.decodeToJson = function (payload) { return JSON.parse(bytesToString(payload)); };
  var B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';
  global.btoa = function (input) {
    var s = String(input), out = '';
    for (var i = 0; i < s.length; i += 3) {
      var a = s.charCodeAt(i), b = s.charCodeAt(i + 1), c = s.charCodeAt(i + 2);
      if (a > 255 || b > 255 || c > 255) throw new Error('btoa: invalid character');
      var n = (a << 16) | ((b || 0) << 8) | (c || 0);
      out += B64.charAt((n >> 18) & 63) + B64.charAt((n >> 12) & 63) +
        (i + 1 < s.length ? B64.charAt((n >> 6) & 63) : '=') +
        (i + 2 < s.length ? B64.charAt(n & 63) : '=');
    }
    return out;
  };
  global.atob = function (input) {
    var s = String(input).replace(/[\s=]+/g, ''), out = '', bits = 0, acc = 0;
    for (var i = 0; i < s.length; i++) {
      var v = B64.indexOf(s.charAt(i));
      if (v < 0) throw new Error('atob: invalid character');
      acc = (acc << 6) | v; bits += 6;
      if (bits >= 8) { bits -= 8; out += fromCharCode((acc >> bits) & 255); }
    }
    return out;
  };
  var log = global.__shardflow_log;
  delete global.__shardflow_log;
  function line(args) { return Array.prototype.map.call(args, function (a) {
    return typeof a === 'string' ? a : JSON.stringify(a); }).join(' '); }
  global.console = {
    log: function () { log(line(arguments)); },
    info: function () { log(line(arguments)); },
    warn: function () { log(line(arguments)); },
    error: function () { log(line(arguments)); }
  };
  // Lockdown. A runtime converts record after record; no script may change
  // the built-ins the next record sees. Every standard global and
  // everything reachable from it (constructors, prototypes, methods) is
  // frozen, and the global bindings become read-only. Scripts may still
  // create globals of their own.
  var seen = [];
  function freeze(value) {
    if (value === null || (typeof value !== 'object' && typeof value !== 'function')) return;
    if (seen.indexOf(value) >= 0) return;
    seen.push(value);
    var keys = Reflect.ownKeys(value);
    for (var k = 0; k < keys.length; k++) {
      var desc = Object.getOwnPropertyDescriptor(value, keys[k]);
      if (desc && 'value' in desc) freeze(desc.value);
      if (desc && desc.get) freeze(desc.get);
      if (desc && desc.set) freeze(desc.set);
    }
    freeze(Object.getPrototypeOf(value));
    Object.freeze(value);
  }
  var names = Object.getOwnPropertyNames(global);
  for (var n = 0; n < names.length; n++) {
    if (names[n] === 'globalThis') continue;
    var desc = Object.getOwnPropertyDescriptor(global, names[n]);
    if (!desc || !('value' in desc)) continue;
    freeze(desc.value);
    Object.defineProperty(global, names[n], { writable: false, configurable: false });
  }
  seen = null;
})(globalThis);
"#;

/// A QuickJS runtime with compiled functions, reused across calls.
pub struct JsRuntime {
    limits: JsLimits,
    engine: Engine,
}

struct Engine {
    // Field order matters: functions must drop before the context and the
    // runtime that own them.
    functions: HashMap<String, Persistent<Function<'static>>>,
    /// `Object.prototype` and `Array.prototype`, which tell plain result
    /// data (frozen at start, so they stay the same).
    prototypes: [Persistent<Object<'static>>; 2],
    context: Context,
    _runtime: Runtime,
    deadline: Rc<Cell<Option<Instant>>>,
}

impl JsRuntime {
    pub fn new(limits: JsLimits) -> Result<Self, JsError> {
        Ok(JsRuntime {
            limits,
            engine: Engine::new(limits)?,
        })
    }

    /// Compiles `body` as the body of `function name(params) { body }` and
    /// keeps it under `key`. Compiling a key again replaces it. `file`
    /// names the script in errors; line numbers are those of `body`.
    /// Scripts run in sloppy mode, as ThingsBoard runs them.
    pub fn compile(
        &mut self,
        key: &str,
        file: &str,
        name: &str,
        params: &str,
        body: &str,
    ) -> Result<(), JsError> {
        // The body starts on the wrapper's first line, so lines match.
        let source = format!("(function {name}({params}) {{{body}\n}})");
        let function = self.engine.context.with(|ctx| {
            let mut options = EvalOptions::default();
            options.strict = false;
            options.filename = Some(file.to_string());
            let function: Function = ctx
                .eval_with_options(source, options)
                .map_err(|e| JsError::Compile(describe_error(&ctx, e)))?;
            Ok::<_, JsError>(Persistent::save(&ctx, function))
        })?;
        self.engine.functions.insert(key.to_string(), function);
        Ok(())
    }

    pub fn is_compiled(&self, key: &str) -> bool {
        self.engine.functions.contains_key(key)
    }

    /// The runtime's limits.
    pub fn limits(&self) -> &JsLimits {
        &self.limits
    }

    /// Forgets the compiled function of `key`.
    pub fn remove(&mut self, key: &str) {
        self.engine.functions.remove(key);
    }

    /// Calls a compiled function and returns its result as JSON
    /// (`undefined` becomes `null`).
    pub fn call(&mut self, key: &str, args: &[JsArg<'_>]) -> Result<serde_json::Value, JsError> {
        self.call_within(key, args, self.limits.call_timeout)
    }

    /// [`JsRuntime::call`] with a time limit of its own (at most the
    /// runtime's).
    pub fn call_within(
        &mut self,
        key: &str,
        args: &[JsArg<'_>],
        timeout: Duration,
    ) -> Result<serde_json::Value, JsError> {
        let timeout = timeout.min(self.limits.call_timeout);
        let function = match self.engine.functions.get(key) {
            Some(f) => f.clone(),
            None => return Err(JsError::Compile(format!("no compiled script `{key}`"))),
        };
        let started = Instant::now();
        self.engine.deadline.set(Some(started + timeout));
        let max_result_bytes = self.limits.max_result_bytes;
        let prototypes = self.engine.prototypes.clone();
        let result = self.engine.context.with(|ctx| {
            let function = function
                .restore(&ctx)
                .map_err(|e| JsError::Thrown(e.to_string()))?;
            let values = args
                .iter()
                .map(|arg| to_js(&ctx, arg))
                .collect::<rquickjs::Result<Vec<Value>>>()
                .map_err(|e| JsError::Thrown(describe_error(&ctx, e)))?;
            let mut call_args = rquickjs::function::Args::new(ctx.clone(), values.len());
            for value in values {
                call_args
                    .push_arg(value)
                    .map_err(|e| JsError::Thrown(describe_error(&ctx, e)))?;
            }
            let value: Value = function
                .call_arg(call_args)
                .map_err(|e| JsError::Thrown(describe_error(&ctx, e)))?;
            let [object_prototype, array_prototype] = prototypes.map(|p| p.restore(&ctx));
            let (object_prototype, array_prototype) = (
                object_prototype.map_err(|e| JsError::Thrown(e.to_string()))?,
                array_prototype.map_err(|e| JsError::Thrown(e.to_string()))?,
            );
            ResultData::new(&ctx, object_prototype, array_prototype, max_result_bytes)
                .convert(value, 0)
                .map(|v| v.unwrap_or_default())
        });
        crate::status::TOTALS.js_call.record(started.elapsed());
        let timed_out = self
            .engine
            .deadline
            .take()
            .is_some_and(|deadline| Instant::now() >= deadline);
        match result {
            Err(JsError::Thrown(_)) if timed_out => {
                self.rebuild();
                Err(JsError::Timeout(timeout))
            }
            Err(JsError::Thrown(message)) | Err(JsError::Result(message))
                if message.starts_with("InternalError: out of memory") || message == "null" =>
            {
                self.rebuild();
                Err(JsError::OutOfMemory(self.limits.memory_limit_bytes >> 20))
            }
            other => other,
        }
    }

    /// Replaces the runtime with a fresh one; compiled functions are lost
    /// and get compiled again on next use.
    fn rebuild(&mut self) {
        match Engine::new(self.limits) {
            Ok(engine) => self.engine = engine,
            Err(e) => tracing::error!(error = %e, "cannot rebuild the JavaScript runtime"),
        }
    }
}

impl Engine {
    fn new(limits: JsLimits) -> Result<Self, JsError> {
        let heap = super::heap::LimitedHeap::new(limits.memory_limit_bytes);
        let runtime = Runtime::new_with_alloc(heap).map_err(|e| JsError::Compile(e.to_string()))?;
        runtime.set_max_stack_size(512 * 1024);
        let deadline: Rc<Cell<Option<Instant>>> = Rc::new(Cell::new(None));
        let watched = deadline.clone();
        let mut polls = 0u32;
        runtime.set_interrupt_handler(Some(Box::new(move || {
            // Reading the clock on every poll costs more than the check.
            polls = polls.wrapping_add(1);
            if !polls.is_multiple_of(16) {
                return false;
            }
            watched.get().is_some_and(|d| Instant::now() >= d)
        })));
        let context = Context::full(&runtime).map_err(|e| JsError::Compile(e.to_string()))?;
        context.with(|ctx| {
            let log = Function::new(ctx.clone(), |line: String| {
                tracing::info!(target: "shardflow::script", "{line}");
            })
            .map_err(|e| JsError::Compile(e.to_string()))?;
            ctx.globals()
                .set("__shardflow_log", log)
                .map_err(|e| JsError::Compile(e.to_string()))?;
            ctx.eval::<(), _>(PRELUDE)
                .map_err(|e| JsError::Compile(describe_error(&ctx, e)))
        })?;
        let prototypes = context.with(|ctx| {
            let prototype = |name: &str| {
                ctx.globals()
                    .get::<_, Object>(name)
                    .and_then(|c| c.get::<_, Object>("prototype"))
            };
            Ok::<_, rquickjs::Error>([
                Persistent::save(&ctx, prototype("Object")?),
                Persistent::save(&ctx, prototype("Array")?),
            ])
        });
        let prototypes = prototypes.map_err(|e| JsError::Compile(e.to_string()))?;
        Ok(Engine {
            prototypes,
            functions: HashMap::new(),
            context,
            _runtime: runtime,
            deadline,
        })
    }
}

/// Turns a script's result into JSON data directly, as `JSON.stringify`
/// and parsing its text would, without making the text: plain objects and
/// arrays are walked in Rust (the bulk of a converter's result), and
/// anything else (a `Date`, an object with `toJSON`, a boxed number, a
/// proxy) goes through `JSON.stringify` itself. Numbers come out as the
/// JSON text would read back: integral values as integers. The size limit
/// counts what the JSON text would hold.
struct ResultData<'a, 'js> {
    ctx: &'a Ctx<'js>,
    object_prototype: Option<Object<'js>>,
    array_prototype: Option<Object<'js>>,
    limit: usize,
    size: usize,
    /// The arrays and objects being converted, outermost first: meeting
    /// one again means the result is circular.
    path: Vec<Value<'js>>,
}

/// How deep a result may nest (converter results are a few levels deep).
const MAX_RESULT_DEPTH: usize = 200;

impl<'a, 'js> ResultData<'a, 'js> {
    fn new(
        ctx: &'a Ctx<'js>,
        object_prototype: Object<'js>,
        array_prototype: Object<'js>,
        limit: usize,
    ) -> Self {
        ResultData {
            ctx,
            object_prototype: Some(object_prototype),
            array_prototype: Some(array_prototype),
            limit,
            size: 0,
            path: Vec::new(),
        }
    }

    fn charge(&mut self, bytes: usize) -> Result<(), JsError> {
        self.size += bytes;
        if self.size > self.limit {
            return Err(JsError::Result(format!(
                "the result is over the limit of {} bytes of JSON",
                self.limit
            )));
        }
        Ok(())
    }

    /// `None` for what JSON leaves out (undefined, functions, symbols).
    fn convert(
        &mut self,
        value: Value<'js>,
        depth: usize,
    ) -> Result<Option<serde_json::Value>, JsError> {
        use rquickjs::Type;
        if depth > MAX_RESULT_DEPTH {
            return Err(JsError::Result(format!(
                "the result is nested deeper than {MAX_RESULT_DEPTH} levels"
            )));
        }
        let data = match value.type_of() {
            Type::Uninitialized
            | Type::Undefined
            | Type::Function
            | Type::Constructor
            | Type::Symbol => return Ok(None),
            Type::Null => {
                self.charge(4)?;
                serde_json::Value::Null
            }
            Type::Bool => {
                self.charge(5)?;
                serde_json::Value::Bool(value.as_bool().unwrap_or(false))
            }
            Type::Int => {
                self.charge(11)?;
                serde_json::Value::from(value.as_int().unwrap_or(0))
            }
            Type::Float => {
                self.charge(24)?;
                json_number(value.as_float().unwrap_or(f64::NAN))
            }
            Type::String => {
                let text = value
                    .as_string()
                    .and_then(|s| s.to_string().ok())
                    .ok_or_else(|| {
                        JsError::Result("a string of the result is not valid text".into())
                    })?;
                self.charge(text.len() + 2)?;
                serde_json::Value::String(text)
            }
            Type::Array if self.is_plain(&value, &self.array_prototype) => {
                self.enter(&value)?;
                let array = self.array(value, depth)?;
                self.path.pop();
                array
            }
            Type::Object if self.is_plain(&value, &self.object_prototype) => {
                self.enter(&value)?;
                let object = self.object(value, depth)?;
                self.path.pop();
                object
            }
            _ => return self.stringified(value),
        };
        Ok(Some(data))
    }

    fn enter(&mut self, container: &Value<'js>) -> Result<(), JsError> {
        if self.path.contains(container) {
            return Err(JsError::Result(
                "the result is a circular structure, which JSON cannot hold".into(),
            ));
        }
        self.path.push(container.clone());
        Ok(())
    }

    /// An array or object of the standard prototype (or none), without
    /// its own `toJSON`.
    fn is_plain(&self, value: &Value<'js>, standard: &Option<Object<'js>>) -> bool {
        let Some(object) = value.as_object() else {
            return false;
        };
        let prototype_ok = match object.get_prototype() {
            None => true,
            Some(prototype) => standard.as_ref() == Some(&prototype),
        };
        prototype_ok && !object.contains_key("toJSON").unwrap_or(true)
    }

    fn array(&mut self, value: Value<'js>, depth: usize) -> Result<serde_json::Value, JsError> {
        let array = value.into_array().expect("checked to be an array");
        self.charge(2)?;
        let mut items = Vec::with_capacity(array.len());
        for item in array.iter::<Value>() {
            let item = item.map_err(|e| JsError::Result(describe_error(self.ctx, e)))?;
            self.charge(1)?;
            items.push(self.convert(item, depth + 1)?.unwrap_or_default());
        }
        Ok(serde_json::Value::Array(items))
    }

    fn object(&mut self, value: Value<'js>, depth: usize) -> Result<serde_json::Value, JsError> {
        let object = value.into_object().expect("checked to be an object");
        self.charge(2)?;
        let mut map = serde_json::Map::new();
        for prop in object.props::<String, Value>() {
            let (key, item) = prop.map_err(|e| JsError::Result(describe_error(self.ctx, e)))?;
            if let Some(item) = self.convert(item, depth + 1)? {
                self.charge(key.len() + 4)?;
                map.insert(key, item);
            }
        }
        Ok(serde_json::Value::Object(map))
    }

    /// What is no plain data: as `JSON.stringify` has it.
    fn stringified(&mut self, value: Value<'js>) -> Result<Option<serde_json::Value>, JsError> {
        let text = self
            .ctx
            .json_stringify(value)
            .map_err(|e| JsError::Result(describe_error(self.ctx, e)))?;
        let Some(text) = text else {
            return Ok(None);
        };
        let text = text
            .to_string()
            .map_err(|e| JsError::Result(e.to_string()))?;
        self.charge(text.len())?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| JsError::Result(e.to_string()))
    }
}

/// A JS number as JSON text would carry it: not-finite numbers are null,
/// integral ones (within 64 bits) integers, as `JSON.stringify` then
/// parsing would give.
fn json_number(f: f64) -> serde_json::Value {
    if !f.is_finite() {
        return serde_json::Value::Null;
    }
    if f.fract() == 0.0 && f.abs() < 1e21 {
        if f >= i64::MIN as f64 && f < i64::MAX as f64 {
            return serde_json::Value::from(f as i64);
        }
        if f >= 0.0 && f < u64::MAX as f64 {
            return serde_json::Value::from(f as u64);
        }
    }
    serde_json::Number::from_f64(f)
        .map(serde_json::Value::Number)
        .unwrap_or_default()
}

fn to_js<'js>(ctx: &Ctx<'js>, arg: &JsArg<'_>) -> rquickjs::Result<Value<'js>> {
    match arg {
        JsArg::Bytes(bytes) => byte_array(ctx, bytes),
        JsArg::StringMap(map) => {
            let object = Object::new(ctx.clone())?;
            for (key, value) in map.iter() {
                object.set(key.as_str(), value.as_str())?;
            }
            Ok(object.into_value())
        }
        JsArg::Json(text) => ctx.json_parse(*text),
        JsArg::RecordMetadata(record) => {
            let object = Object::new(ctx.clone())?;
            object.set("integrationName", &*record.integration)?;
            object.set("streamName", &*record.stream)?;
            object.set("shardId", &*record.shard)?;
            object.set("partitionKey", record.partition_key.as_str())?;
            object.set("sequenceNumber", record.sequence_number.as_str())?;
            object.set("approximateArrivalTimestamp", record.arrival_ms.to_string())?;
            // A user record of a KPL aggregate also says where it sits in it.
            if let Some(sub) = record.sub_sequence_number {
                object.set("subSequenceNumber", sub.to_string())?;
            }
            if let Some(key) = &record.explicit_hash_key {
                object.set("explicitHashKey", key.as_str())?;
            }
            Ok(object.into_value())
        }
        JsArg::Str(text) => rquickjs::String::from_str(ctx.clone(), text).map(|s| s.into_value()),
    }
}

/// A real JS Array of numbers (0..255), built in one step: the values are
/// small integers, which QuickJS stores inline, and `JS_NewArrayFrom`
/// copies them into a new dense array.
fn byte_array<'js>(ctx: &Ctx<'js>, bytes: &[u8]) -> rquickjs::Result<Value<'js>> {
    let count = i32::try_from(bytes.len()).map_err(|_| rquickjs::Error::Allocation)?;
    // The tag constant's integer type differs between bindings targets.
    #[allow(clippy::unnecessary_cast)]
    let values: Vec<qjs::JSValue> = bytes
        .iter()
        .map(|b| qjs::JS_MKVAL(qjs::JS_TAG_INT as i32, i32::from(*b)))
        .collect();
    // SAFETY: integer JSValues hold no reference, so copying them needs no
    // reference counting; `JS_NewArrayFrom` returns a new array value that
    // we own and hand to `Value::from_raw`, which frees it on drop.
    unsafe {
        let raw = qjs::JS_NewArrayFrom(ctx.as_raw().as_ptr(), count, values.as_ptr());
        if qjs::JS_IsException(raw) {
            return Err(rquickjs::Error::Exception);
        }
        Ok(Value::from_raw(ctx.clone(), raw))
    }
}

/// Turns a QuickJS error into a message, with the thrown value's text and
/// stack when there is one.
fn describe_error(ctx: &Ctx<'_>, error: rquickjs::Error) -> String {
    if !matches!(error, rquickjs::Error::Exception) {
        return error.to_string();
    }
    let thrown = ctx.catch();
    if let Some(exception) = thrown.as_exception() {
        let message = exception.message().unwrap_or_default();
        let name: String = exception
            .get::<_, String>("name")
            .unwrap_or_else(|_| "Error".into());
        let stack = exception.stack().unwrap_or_default();
        let location = stack.lines().next().map(str::trim).unwrap_or("");
        if location.is_empty() {
            format!("{name}: {message}")
        } else {
            format!("{name}: {message} ({location})")
        }
    } else if let Ok(Some(text)) = ctx.json_stringify(thrown.clone()) {
        text.to_string()
            .unwrap_or_else(|_| "unknown value thrown".into())
    } else {
        "a non-serialisable value was thrown".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn runtime() -> JsRuntime {
        runtime_with(Duration::from_millis(200), 32)
    }

    /// A runtime with this call timeout and memory limit (MiB).
    pub(super) fn runtime_with(call_timeout: Duration, memory_mb: usize) -> JsRuntime {
        JsRuntime::new(JsLimits {
            call_timeout,
            memory_limit_bytes: memory_mb << 20,
            max_result_bytes: 1 << 20,
        })
        .unwrap()
    }

    #[test]
    fn payload_is_a_real_array() {
        let mut js = runtime();
        js.compile("t", "test.js", "Decoder",
            "payload, metadata",
            "return [Array.isArray(payload), payload.map(function(b){return ('0'+b.toString(16)).slice(-2)}).join('')];",
        )
        .unwrap();
        let out = js.call("t", &[JsArg::Bytes(&[0, 15, 255])]).unwrap();
        assert_eq!(out, serde_json::json!([true, "000fff"]));
    }

    #[test]
    fn from_char_code_apply_takes_payloads_over_64k() {
        let mut js = runtime();
        js.compile(
            "t",
            "test.js",
            "Decoder",
            "payload",
            "return String.fromCharCode.apply(String, payload).length;",
        )
        .unwrap();
        let bytes = vec![b'a'; 100_000];
        assert_eq!(
            js.call("t", &[JsArg::Bytes(&bytes)]).unwrap(),
            serde_json::json!(100_000)
        );
    }

    #[test]
    fn infinite_loop_is_stopped_and_runtime_recovers() {
        let mut js = runtime();
        js.compile("loop", "test.js", "F", "", "while (true) {}")
            .unwrap();
        assert!(matches!(js.call("loop", &[]), Err(JsError::Timeout(_))));
        js.compile("ok", "test.js", "F", "", "return 1 + 1;")
            .unwrap();
        assert_eq!(js.call("ok", &[]).unwrap(), serde_json::json!(2));
    }

    #[test]
    fn unbounded_allocation_hits_the_memory_limit() {
        let mut js = runtime_with(Duration::from_secs(60), 16);
        js.compile(
            "oom",
            "test.js",
            "F",
            "",
            "var a = []; while (true) a.push('xxxxxxxxxxxxxxxx' + a.length);",
        )
        .unwrap();
        let err = js.call("oom", &[]).unwrap_err();
        assert!(
            matches!(err, JsError::OutOfMemory(_) | JsError::Timeout(_)),
            "{err:?}"
        );
    }

    #[test]
    fn deep_recursion_and_a_gigabyte_string_are_stopped_and_the_runtime_recovers() {
        let mut js = runtime_with(Duration::from_secs(60), 16);
        js.compile(
            "deep",
            "test.js",
            "F",
            "",
            "function f(n) { return f(n + 1) + 1; } return f(0);",
        )
        .unwrap();
        let err = js.call("deep", &[]).unwrap_err();
        assert!(
            format!("{err:?}").contains("Maximum call stack size exceeded"),
            "{err:?}"
        );
        js.compile(
            "huge",
            "test.js",
            "F",
            "",
            "return 'x'.repeat(1 << 30).length;",
        )
        .unwrap();
        let err = js.call("huge", &[]).unwrap_err();
        assert!(
            matches!(err, JsError::OutOfMemory(_)) || format!("{err}").contains("RangeError"),
            "{err:?}"
        );
        js.compile("ok", "test.js", "F", "", "return 6 * 7;")
            .unwrap();
        assert_eq!(js.call("ok", &[]).unwrap(), serde_json::json!(42));
    }

    #[test]
    fn scripts_reach_no_file_system_network_process_or_environment() {
        let mut js = runtime();
        js.compile(
            "host",
            "test.js",
            "F",
            "",
            "return [typeof require, typeof process, typeof std, typeof os, typeof fetch, \
             typeof XMLHttpRequest, typeof WebSocket, typeof Deno, typeof scriptArgs];",
        )
        .unwrap();
        assert_eq!(
            js.call("host", &[]).unwrap(),
            serde_json::Value::Array(vec![serde_json::json!("undefined"); 9])
        );
    }

    #[test]
    fn thrown_errors_carry_their_message() {
        let mut js = runtime();
        js.compile("t", "test.js", "F", "", "throw new Error('bad payload');")
            .unwrap();
        let err = js.call("t", &[]).unwrap_err().to_string();
        assert!(err.contains("bad payload"), "{err}");
    }

    #[test]
    fn atob_and_btoa_round_trip() {
        let mut js = runtime();
        js.compile(
            "t",
            "test.js",
            "F",
            "",
            "return [btoa('hello'), atob('aGVsbG8=')];",
        )
        .unwrap();
        assert_eq!(
            js.call("t", &[]).unwrap(),
            serde_json::json!(["aGVsbG8=", "hello"])
        );
    }
}

#[cfg(test)]
mod compatibility_tests {
    use super::tests::{runtime, runtime_with};
    use super::*;

    /// The direct conversion of results gives what JSON.stringify and
    /// parsing the text give, value kinds included.
    #[test]
    fn results_convert_as_json_stringify_would() {
        let cases = [
            "22", "22.0", "-0", "0.1", "1e21", "1e20", "2e19", "9007199254740993", "NaN",
            "Infinity", "'text'", "'\\u00e9\\u4e2d'", "true", "null", "[1, undefined, function () {}, , 3]",
            "({a: 1, b: undefined, c: function () {}, d: [{e: null}]})",
            "({toJSON: function () { return {replaced: true}; }})",
            "new Date(0)", "Object.create(null)", "new Number(5)", "new String('s')",
            "[new Boolean(false)]", "({nested: {deeper: {deepest: [1.5, -2, 'x']}}})",
            "(function () { var o = {}; Object.defineProperty(o, 'hidden', {value: 1, enumerable: false}); o.shown = 2; return o; })()",
            "(function () { var o = {}; Object.defineProperty(o, 'lazy', {get: function () { return 7; }, enumerable: true}); return o; })()",
            "new Error('e')", "/re/g", "new Map([[1, 2]])", "[[], {}]",
        ];
        let mut js = runtime();
        for (i, case) in cases.iter().enumerate() {
            let direct = format!("d{i}");
            js.compile(&direct, "t.js", "F", "", &format!("return {case};"))
                .unwrap();
            let text = format!("t{i}");
            js.compile(
                &text,
                "t.js",
                "F",
                "",
                &format!(
                    "var s = JSON.stringify({case}); return s === undefined ? undefined : '' + s;"
                ),
            )
            .unwrap();
            let converted = js.call(&direct, &[]).unwrap();
            let through_text = match js.call(&text, &[]).unwrap() {
                serde_json::Value::String(text) => serde_json::from_str(&text).unwrap(),
                other => other,
            };
            assert_eq!(converted, through_text, "{case}");
        }
    }

    #[test]
    fn circular_and_big_int_results_are_errors() {
        let mut js = runtime();
        js.compile("c", "t.js", "F", "", "var o = {}; o.self = o; return o;")
            .unwrap();
        assert!(matches!(js.call("c", &[]), Err(JsError::Result(_))));
        js.compile("b", "t.js", "F", "", "return {n: 10n};")
            .unwrap();
        assert!(js.call("b", &[]).is_err());
    }

    #[test]
    fn a_script_cannot_change_built_ins_for_the_next_call() {
        let mut js = runtime();
        js.compile(
            "poison",
            "test.js",
            "F",
            "",
            "JSON.parse = function () { return 'pwned'; };
             Object.prototype.toJSON = function () { return 'pwned'; };
             Array.prototype.map = null; String.fromCharCode = null; decodeToJson = null;
             return 1;",
        )
        .unwrap();
        js.compile(
            "clean",
            "test.js",
            "F",
            "payload",
            "return [JSON.parse('{\"a\":1}'), [1].map(function (x) { return x + 1; }), decodeToJson(payload)];",
        )
        .unwrap();
        let _ = js.call("poison", &[]);
        let out = js.call("clean", &[JsArg::Bytes(b"{\"b\":2}")]).unwrap();
        assert_eq!(out, serde_json::json!([{"a": 1}, [2], {"b": 2}]));
    }

    #[test]
    fn scripts_may_still_use_their_own_globals() {
        let mut js = runtime();
        js.compile(
            "t",
            "test.js",
            "F",
            "",
            "counter = (typeof counter === 'number' ? counter : 0) + 1; return counter;",
        )
        .unwrap();
        assert_eq!(js.call("t", &[]).unwrap(), serde_json::json!(1));
        assert_eq!(js.call("t", &[]).unwrap(), serde_json::json!(2));
    }

    #[test]
    fn oversized_results_are_refused() {
        let mut js = runtime_with(Duration::from_secs(10), 32);
        js.compile(
            "t",
            "test.js",
            "F",
            "",
            "var a = []; for (var i = 0; i < 200000; i++) a.push({v: i}); return a;",
        )
        .unwrap();
        let err = js.call("t", &[]).unwrap_err().to_string();
        assert!(err.contains("over the limit"), "{err}");
    }

    #[test]
    fn an_error_mentioning_memory_is_not_taken_for_running_out() {
        let mut js = runtime();
        js.compile("t", "test.js", "F", "", "throw new Error('out of memory');")
            .unwrap();
        assert!(matches!(js.call("t", &[]), Err(JsError::Thrown(_))));
    }

    #[test]
    fn scripts_run_in_sloppy_mode_like_thingsboard() {
        let mut js = runtime();
        js.compile(
            "t",
            "test.js",
            "F",
            "",
            "undeclared = 5; return undeclared;",
        )
        .unwrap();
        assert_eq!(js.call("t", &[]).unwrap(), serde_json::json!(5));
    }

    #[test]
    fn compile_errors_name_the_file_and_the_line_of_the_body() {
        let mut js = runtime();
        let err = js
            .compile(
                "t",
                "converters/up.js",
                "F",
                "",
                "var a = 1;\nvar b = 2;\nvar c = ;",
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("converters/up.js:3"), "{err}");
    }
}
