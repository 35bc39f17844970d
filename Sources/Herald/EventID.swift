import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// A CloudEvents `id`. Herald creates UUIDv7 ids (unique and time-sortable); ids received from elsewhere
/// may be any non-empty string and are kept exactly as received.
public struct EventID: Hashable, Sendable, Comparable, CustomStringConvertible {
    @usableFromInline
    enum Storage: Hashable, Sendable {
        case uuid(UInt64, UInt64)
        case text(String)
    }

    @usableFromInline
    let storage: Storage

    /// A new UUIDv7: 48 bits of Unix milliseconds, then a process-wide counter, so ids made in one process
    /// sort in creation order, and a random per-process suffix.
    @inlinable
    public init() {
        let (high, low) = UUIDv7.next()
        storage = .uuid(high, low)
    }

    /// An id from its text. A canonical lowercase UUID is stored compactly; anything else verbatim.
    public init(_ text: String) {
        if let (high, low) = UUIDv7.parse(text) {
            storage = .uuid(high, low)
        } else {
            storage = .text(text)
        }
    }

    /// The Unix milliseconds embedded in a UUIDv7 id, or nil for other ids.
    public var unixMilliseconds: UInt64? {
        guard case .uuid(let high, _) = storage, (high >> 12) & 0xF == 7 else { return nil }
        return high >> 16
    }

    public var description: String {
        switch storage {
        case .uuid(let high, let low): return UUIDv7.format(high, low)
        case .text(let text): return text
        }
    }

    public static func < (lhs: EventID, rhs: EventID) -> Bool {
        switch (lhs.storage, rhs.storage) {
        case (.uuid(let lh, let ll), .uuid(let rh, let rl)): return (lh, ll) < (rh, rl)
        default: return lhs.description < rhs.description
        }
    }
}

@usableFromInline
enum UUIDv7 {
    static let counter = Atomic<UInt64>(UInt64.random(in: 0..<(1 << 32)))
    static let suffix = UInt64.random(in: 0...UInt64(UInt32.max))

    @usableFromInline
    static func next() -> (UInt64, UInt64) {
        let milliseconds = UInt64(Timestamp.coarseNow().nanosecondsSinceEpoch / 1_000_000)
        let count = counter.wrappingAdd(1, ordering: .relaxed).oldValue
        let randA = (count >> 30) & 0xFFF
        let high = (milliseconds << 16) | (0x7 << 12) | randA
        let low = (0b10 << 62) | ((count & 0x3FFF_FFFF) << 32) | suffix
        return (high, low)
    }

    private static let hexDigits: [UInt8] = Array("0123456789abcdef".utf8)

    static func format(_ high: UInt64, _ low: UInt64) -> String {
        String(unsafeUninitializedCapacity: 36) { buffer in
            var index = 0
            func put(_ value: UInt64, nibbles: Int) {
                var shift = (nibbles - 1) * 4
                while shift >= 0 {
                    buffer[index] = hexDigits[Int((value >> UInt64(shift)) & 0xF)]
                    index += 1
                    shift -= 4
                }
            }
            func dash() {
                buffer[index] = UInt8(ascii: "-")
                index += 1
            }
            put(high >> 32, nibbles: 8)
            dash()
            put((high >> 16) & 0xFFFF, nibbles: 4)
            dash()
            put(high & 0xFFFF, nibbles: 4)
            dash()
            put(low >> 48, nibbles: 4)
            dash()
            put(low & 0xFFFF_FFFF_FFFF, nibbles: 12)
            return 36
        }
    }

    static func parse(_ text: String) -> (UInt64, UInt64)? {
        guard text.utf8.count == 36 else { return nil }
        var copy = text
        return copy.withUTF8 { bytes -> (UInt64, UInt64)? in
            var high: UInt64 = 0
            var low: UInt64 = 0
            var nibble = 0
            for (position, byte) in bytes.enumerated() {
                if position == 8 || position == 13 || position == 18 || position == 23 {
                    guard byte == UInt8(ascii: "-") else { return nil }
                    continue
                }
                let value: UInt64
                switch byte {
                case UInt8(ascii: "0")...UInt8(ascii: "9"): value = UInt64(byte - UInt8(ascii: "0"))
                case UInt8(ascii: "a")...UInt8(ascii: "f"): value = UInt64(byte - UInt8(ascii: "a") + 10)
                default: return nil
                }
                if nibble < 16 { high = high << 4 | value } else { low = low << 4 | value }
                nibble += 1
            }
            return (high, low)
        }
    }
}

/// A point in time with nanosecond precision, as nanoseconds since the Unix epoch (UTC).
public struct Timestamp: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var nanosecondsSinceEpoch: Int64

    public init(nanosecondsSinceEpoch: Int64) {
        self.nanosecondsSinceEpoch = nanosecondsSinceEpoch
    }

    /// The wall-clock time now.
    public static func now() -> Timestamp {
        var spec = timespec()
        clock_gettime(CLOCK_REALTIME, &spec)
        return Timestamp(nanosecondsSinceEpoch: Int64(spec.tv_sec) * 1_000_000_000 + Int64(spec.tv_nsec))
    }

    /// The wall-clock time now at the kernel's tick resolution (a few milliseconds), cheaper than `now()`.
    @usableFromInline
    static func coarseNow() -> Timestamp {
        var spec = timespec()
        #if os(Linux)
            clock_gettime(CLOCK_REALTIME_COARSE, &spec)
        #else
            clock_gettime(CLOCK_REALTIME, &spec)
        #endif
        return Timestamp(nanosecondsSinceEpoch: Int64(spec.tv_sec) * 1_000_000_000 + Int64(spec.tv_nsec))
    }

    public static func < (lhs: Timestamp, rhs: Timestamp) -> Bool {
        lhs.nanosecondsSinceEpoch < rhs.nanosecondsSinceEpoch
    }

    /// This time moved by a duration.
    public func advanced(by duration: Duration) -> Timestamp {
        Timestamp(nanosecondsSinceEpoch: nanosecondsSinceEpoch + duration.nanoseconds)
    }

    /// The duration from this time to another.
    public func duration(to other: Timestamp) -> Duration {
        .nanoseconds(other.nanosecondsSinceEpoch - nanosecondsSinceEpoch)
    }

    /// RFC 3339 text in UTC, for example `2026-11-26T16:12:43.123456789Z`.
    public var description: String { RFC3339.format(self) }
}

extension Duration {
    /// The duration in whole nanoseconds (saturating). Shared by every Herald module.
    package var nanoseconds: Int64 {
        let (seconds, attoseconds) = components
        let (product, overflow) = seconds.multipliedReportingOverflow(by: 1_000_000_000)
        if overflow { return seconds < 0 ? .min : .max }
        return product + attoseconds / 1_000_000_000
    }

    /// The duration in whole milliseconds (saturating).
    package var milliseconds: Int64 { nanoseconds / 1_000_000 }
}

/// Monotonic nanoseconds, for measuring latency and deadlines inside one process.
@inlinable
public func monotonicNanoseconds() -> UInt64 {
    var spec = timespec()
    clock_gettime(CLOCK_MONOTONIC, &spec)
    return UInt64(spec.tv_sec) * 1_000_000_000 + UInt64(spec.tv_nsec)
}
