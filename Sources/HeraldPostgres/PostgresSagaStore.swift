import Herald
import Logging
import NIOCore
import PostgresNIO

/// Saga instances in PostgreSQL (`herald_sagas`), for `SagaManager`: state survives restarts, and several
/// instances of a service may run one saga — a save names the version it read, and a concurrent change makes it
/// throw `SagaStoreError` (the manager retries on fresh state).
public struct PostgresSagaStore: SagaStore {
    public let client: PostgresClient
    private let logger: Logger

    public init(client: PostgresClient, logger: Logger = Logger(label: "herald.saga.postgres")) {
        self.client = client
        self.logger = logger
    }

    public func load(saga: String, id: String) async throws -> SagaRecord? {
        let rows = try await client.query(
            "SELECT state, version, deadline, finished FROM herald_sagas WHERE saga = \(saga) AND id = \(id)",
            logger: logger)
        for try await (state, version, deadline, finished) in rows.decode((ByteBuffer, Int64, Int64?, Bool).self) {
            return SagaRecord(
                saga: saga, id: id, state: Array(buffer: state), version: Int(version),
                deadline: deadline.map { Timestamp(nanosecondsSinceEpoch: $0) }, finished: finished)
        }
        return nil
    }

    public func save(_ record: SagaRecord) async throws {
        let state = ByteBuffer(bytes: record.state)
        let deadline = record.deadline?.nanosecondsSinceEpoch
        let version = Int64(record.version)
        let rows: PostgresRowSequence
        if record.version == 1 {
            rows = try await client.query(
                """
                INSERT INTO herald_sagas (saga, id, state, version, deadline, finished)
                VALUES (\(record.saga), \(record.id), \(state), 1, \(deadline), \(record.finished))
                ON CONFLICT (saga, id) DO NOTHING RETURNING 1
                """, logger: logger)
        } else {
            rows = try await client.query(
                """
                UPDATE herald_sagas SET state = \(state), version = \(version), deadline = \(deadline),
                finished = \(record.finished), updated_at = now()
                WHERE saga = \(record.saga) AND id = \(record.id) AND version = \(version - 1)
                RETURNING 1
                """, logger: logger)
        }
        for try await _ in rows { return }
        throw SagaStoreError(saga: record.saga, id: record.id)
    }

    public func expired(saga: String, at time: Timestamp, limit: Int) async throws -> [SagaRecord] {
        let rows = try await client.query(
            """
            SELECT id, state, version, deadline FROM herald_sagas
            WHERE saga = \(saga) AND NOT finished AND deadline IS NOT NULL AND deadline <= \(time.nanosecondsSinceEpoch)
            ORDER BY deadline LIMIT \(limit)
            """, logger: logger)
        var records: [SagaRecord] = []
        for try await (id, state, version, deadline) in rows.decode((String, ByteBuffer, Int64, Int64).self) {
            records.append(
                SagaRecord(
                    saga: saga, id: id, state: Array(buffer: state), version: Int(version),
                    deadline: Timestamp(nanosecondsSinceEpoch: deadline), finished: false))
        }
        return records
    }
}
