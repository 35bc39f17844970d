import CHeraldCRC32C

/// CRC-32C (Castagnoli), the checksum of every log record (hardware-accelerated where the CPU has it).
public enum CRC32C {
    public static func checksum(_ bytes: UnsafeRawBufferPointer, continuing crc: UInt32 = 0) -> UInt32 {
        herald_crc32c(crc, bytes.baseAddress, bytes.count)
    }

    public static func checksum(_ bytes: some ContiguousBytes) -> UInt32 {
        bytes.withUnsafeBytes { checksum($0) }
    }
}

/// Anything that can lend its bytes contiguously.
public protocol ContiguousBytes {
    func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R
}

extension Array: ContiguousBytes where Element == UInt8 {}
extension ArraySlice: ContiguousBytes where Element == UInt8 {}
