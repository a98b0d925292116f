//! Request decoding under arbitrary input: every body type of the API, the list query, and
//! bearer keys. Decoding must never panic, and every refusal must be a 4xx.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memu_worker::api::admin::{CreateKey, CreateTenant};
use memu_worker::api::cloud_v1::{
    DefaultCategoriesRequest, DeleteRequest, RelatedCategoriesRequest, RelatedItemsRequest,
};
use memu_worker::api::error::{ApiError, parse_json};
use memu_worker::api::items::{CreateItem, DocumentRequest, ListParams, UpdateItem};
use memu_worker::api::memu::{MemorizeRequest, RetrieveRequest, ScopeRequest};
use memu_worker::tenancy::{TenantLimits, key_id_of};

fn refused_with_4xx<T>(result: Result<T, ApiError>) {
    if let Err(e) = result {
        assert!(e.status.is_client_error(), "{} for {}", e.status, e.message);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    match selector % 15 {
        0 => refused_with_4xx(parse_json::<MemorizeRequest>(body)),
        1 => refused_with_4xx(parse_json::<RetrieveRequest>(body)),
        2 => refused_with_4xx(parse_json::<ScopeRequest>(body)),
        3 => refused_with_4xx(parse_json::<CreateItem>(body)),
        4 => refused_with_4xx(parse_json::<UpdateItem>(body)),
        5 => refused_with_4xx(parse_json::<DocumentRequest>(body)),
        6 => refused_with_4xx(parse_json::<CreateTenant>(body)),
        7 => refused_with_4xx(parse_json::<CreateKey>(body)),
        8 => refused_with_4xx(parse_json::<TenantLimits>(body)),
        9 => {
            let _ = serde_urlencoded::from_bytes::<ListParams>(body);
        }
        10 => refused_with_4xx(parse_json::<DefaultCategoriesRequest>(body)),
        11 => refused_with_4xx(parse_json::<RelatedItemsRequest>(body)),
        12 => refused_with_4xx(parse_json::<RelatedCategoriesRequest>(body)),
        13 => refused_with_4xx(parse_json::<DeleteRequest>(body)),
        _ => {
            if let Ok(token) = std::str::from_utf8(body)
                && let Some(id) = key_id_of(token)
            {
                assert_eq!(id.len(), 12);
            }
        }
    }
});
